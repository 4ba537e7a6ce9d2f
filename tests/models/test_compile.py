"""Regional compilation (--compile): which layers, where inductor caches, and that a compiled
SFT run learns what the eager one learns and saves the same checkpoint keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from posttrain.config import ConfigError, SFTConfig, build_config
from posttrain.models.compile import INDUCTOR_CACHE, compile_layers, decoder_layers


def test_decoder_layers_are_the_models_no_split_modules(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    layers = decoder_layers(model, "compile")
    assert layers == list(model.model.layers) and len(layers) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match=r"^compile: Linear has no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2), "compile")


def test_no_compiler_is_refused_before_any_layer_is_touched(tiny_model_and_tokenizer, monkeypatch):
    model, _ = tiny_model_and_tokenizer
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError, match=r"compile: no C\+\+ compiler 'no-such-c\+\+-compiler' on PATH"):
        compile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    monkeypatch.setenv("CXX", "/bin/false")   # there, but compiles nothing
    with pytest.raises(ValueError, match=r"compile: the C\+\+ compiler '/bin/false' cannot compile an empty program"):
        compile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


@pytest.mark.parametrize("before, after", [
    (None, "posttrain"),                 # unset: posttrain's cache folder
    ("default", "posttrain"),            # inductor's default, written back by an earlier import
    ("/somewhere/else", "/somewhere/else"),  # the user's own: kept
])
def test_inductor_cache_goes_under_posttrains_cache_unless_the_user_chose(before, after, monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    if before is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir() if before == "default" else before)
    model = torch.nn.Module()
    model._no_split_modules = ["Linear"]
    model.layer = torch.nn.Linear(2, 2)
    assert compile_layers(model) == 1
    expected = str(tmp_path / INDUCTOR_CACHE) if after == "posttrain" else after
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == expected


def test_compile_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match=r"compile=True cannot be combined with sharding=fsdp"):
        build_config(SFTConfig, None, {"data": "d.jsonl", "compile": True, "sharding": "fsdp"})


def test_a_compiled_run_matches_the_eager_one(tmp_path):
    # fp32 so that the only difference left is inductor's float rounding; the checkpoint is
    # written mid-run (save_steps) so that its keys are seen too: compiling in place must not
    # rename parameters (torch.compile's wrapper module would prefix them with _orig_mod).
    records = [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in ("abc", "hello", "xy", "posttrain")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    base = dict(model="tiny-random", data=str(data), precision="fp32", lr=1e-3, warmup_ratio=0.0,
                lr_scheduler="constant", max_length=64, max_steps=2, batch_size=4, save_steps=1)
    from posttrain.trainers import sft

    runs = {}
    for compiled in (False, True):
        cfg = build_config(SFTConfig, None, {**base, "output_dir": str(tmp_path / str(compiled)), "compile": compiled})
        runs[compiled] = sft.train(cfg)
    losses = [[json.loads(line)["loss/train"] for line in (runs[c] / "metrics.jsonl").read_text().splitlines()]
              for c in (False, True)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[1][1] < losses[1][0]
    eager, compiled = load_file(str(runs[False] / "model.safetensors")), load_file(str(runs[True] / "model.safetensors"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4)
    checkpoints = [sorted(p.name for p in Path(runs[c], "checkpoints").rglob("*")) for c in (False, True)]
    assert checkpoints[0] == checkpoints[1] and checkpoints[0]


def test_a_run_may_resume_with_compile_switched():
    # compile changes how a step is computed, not what it learns: a checkpoint resumes either way,
    # and one written before the key existed too.
    from posttrain.trainers.run_folder import config_differences

    fingerprint = {"data": "x", "eval_data": ""}
    assert config_differences({"lr": 1.0, "compile": False}, {"lr": 1.0, "compile": True}, None, fingerprint) == []
    assert config_differences({"lr": 1.0}, {"lr": 1.0, "compile": True}, None, fingerprint) == []
    assert config_differences({"lr": 1.0}, {"lr": 2.0, "compile": True}, None, fingerprint) == ["lr (1.0 → 2.0)"]
