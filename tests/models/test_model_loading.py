import logging

import pytest
import torch

from posttrain.models import BUILTIN_MODELS, load_causal_lm, load_tokenizer, resolve_model_path
from posttrain.models.attention import ATTENTION
from posttrain.models.tiny import build_tiny_tokenizer


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {"smollm2-135m-instruct", "tiny-random"}


def test_resolve_builtin_and_local(tiny_path):
    assert resolve_model_path("tiny-random") == str(tiny_path)
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/model.v1_2-x"])
def test_hub_ids_pass_through(hub_id, monkeypatch):
    import posttrain.models.load as load

    monkeypatch.setattr(load, "hub_unreachable", lambda: None)  # as where the hub answers
    assert resolve_model_path(hub_id) == hub_id


@pytest.mark.parametrize("bad", ["a/b/c", "org/../x"])
def test_missing_paths_fail(bad):
    with pytest.raises(ValueError, match="not a built-in"):
        resolve_model_path(bad)


@pytest.mark.parametrize("bad", ["./no/such/folder", "/no/such/folder", "~/nope/x"])
def test_missing_local_paths_fail_at_once(bad):
    with pytest.raises(FileNotFoundError, match=r"no such folder$"):
        resolve_model_path(bad)


def test_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(str(file))


def test_load_tiny(tiny_path):
    model = load_causal_lm(str(tiny_path))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == ATTENTION
    assert load_causal_lm(str(tiny_path), dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        load_causal_lm(str(tiny_path), dtype=torch.float16)


def test_tokenizer_without_chat_template_fails(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_without_pad_uses_eos(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="posttrain.models.load"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert "no pad token" in caplog.text
