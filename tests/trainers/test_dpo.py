"""DPO trainer: every loss × every reference mode, precomputed = frozen copy, accumulation,
resume after SIGTERM, two processes, bad input, and a learning test on a toy task."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from process_groups import run_group
from posttrain import cli
from posttrain.config import DPOConfig, SFTConfig, build_config
from posttrain.data import load_preference_pairs
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.pairs import collate_pairs, sequence_logps
from posttrain.trainers import dpo, sft


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs of different lengths: chosen reverses the word, rejected repeats it twice."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(n)]
    return [{"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w + w} for w in words]


def config(tmp_path: Path, name: str, data: Path, **kw) -> DPOConfig:
    base = dict(model="tiny-random", data=str(data), output_dir=str(tmp_path / name), precision="fp32",
                lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", max_length=64)
    base.update(kw)
    return build_config(DPOConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def starting_logps(data: Path, indices=None):
    """Summed log-probs (chosen, rejected) of the pairs under the untrained tiny model."""
    tok = load_tokenizer("tiny-random")
    pairs, _ = load_preference_pairs(str(data), tok, max_length=64)
    pairs = pairs if indices is None else [pairs[i] for i in indices]
    with torch.no_grad():
        return sequence_logps(TokenLogprobs(load_causal_lm("tiny-random")),
                              collate_pairs(pairs, tok.pad_token_id, prefix_sharing=True), "cpu")


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """The reference objects the trainer builds, and a private cache for precomputed log-probs."""
    made = []

    def recording(cls):
        class Recorded(cls):
            def __init__(self, *args):
                super().__init__(*args)
                made.append(self)

        Recorded.__name__ = cls.__name__
        return Recorded

    for name in ("FrozenCopy", "AdaptersOff"):
        monkeypatch.setattr(dpo, name, recording(getattr(dpo, name)))
    monkeypatch.setattr(dpo, "cache_root", lambda: tmp_path / "cache")
    return made


CASES = [(loss, mode) for loss in ("sigmoid", "robust", "ipo", "hinge")
         for mode in ("frozen_copy", "adapters_off", "precomputed")] + [("simpo", "none"), ("orpo", "none")]


@pytest.mark.parametrize("loss,mode", CASES)
def test_every_loss_and_reference_mode_trains_the_policy_only(tmp_path, tiny_path, captured, loss, mode):
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(8))
    held = write_jsonl(tmp_path / "e.jsonl", toy_pairs(3, seed=1))
    extra = {"adapters_off": dict(lora_r=4, lora_alpha=8.0), "precomputed": dict(precompute_ref=True)}.get(mode, {})
    out = dpo.train(config(tmp_path, "run", data, eval_data=str(held), loss=loss, max_steps=2, batch_size=4,
                           label_smoothing=0.1 if loss == "robust" else 0.0, **extra))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2]
    for key in ("loss/train", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows[:2]), key
        assert torch.isfinite(torch.tensor(rows[2]["eval/" + key.replace("/train", "")])), key
    if mode != "none":
        # Before the first update the policy is the reference: every implicit reward is 0.
        assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
        assert rows[0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    start, after = weights(tiny_path), weights(out)
    assert any(not torch.equal(start[k], after[k]) for k in start), "policy weights did not change"

    # The reference still computes the starting model's log-probs.
    expected = starting_logps(data)
    if mode in ("frozen_copy", "adapters_off"):
        (reference,) = captured
        assert type(reference).__name__ == {"frozen_copy": "FrozenCopy", "adapters_off": "AdaptersOff"}[mode]
        tok = load_tokenizer("tiny-random")
        pairs, _ = load_preference_pairs(str(data), tok, max_length=64)
        got = reference.logps(collate_pairs(pairs, tok.pad_token_id, prefix_sharing=True))
    else:
        assert not captured
        cached = sorted((tmp_path / "cache" / "reference-logps").glob("*.safetensors"))
        assert len(cached) == (2 if mode == "precomputed" else 0)
        if mode == "none":
            return
        tables = [load_file(str(p))["ref_logps"] for p in cached]
        (table,) = [t for t in tables if t.shape[0] == 8]
        got = table.unbind(-1)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-5)


def test_output_loads_with_from_pretrained(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(4))
    out = dpo.train(config(tmp_path, "run", data, max_steps=1, batch_size=4, lora_r=4))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(load_tokenizer(str(out)))
    assert (out / "config.yaml").is_file()


def test_precomputed_reference_equals_frozen_copy_step_for_step(tmp_path, captured):
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(12))
    kw = dict(max_steps=5, batch_size=3, seed=3)
    frozen = dpo.train(config(tmp_path, "frozen", data, **kw))
    pre = dpo.train(config(tmp_path, "pre", data, precompute_ref=True, **kw))
    a, b = metrics(frozen), metrics(pre)
    for x, y in zip(a, b):
        for key in ("loss/train", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)
    wa, wb = weights(frozen), weights(pre)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    # A second run reuses the cache instead of recomputing it.
    again = dpo.train(config(tmp_path, "again", data, precompute_ref=True, **kw))
    assert metrics(again)[-1]["loss/train"] == pytest.approx(b[-1]["loss/train"], abs=1e-6)
    assert len(list((tmp_path / "cache" / "reference-logps").iterdir())) == 1


def test_accumulation_equals_one_big_batch(tmp_path):
    # 1 micro-batch of 8 pairs vs 8 of 1: the loss is Σ over pairs / the global pair count,
    # so the update must match to rounding. With eps ≫ |g| Adam's first step is lr·g/eps,
    # so the weights show the gradient itself (see the SFT test).
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(8))
    sgd_like = dict(max_steps=1, lr=1.0, adam_eps=1.0, max_grad_norm=0.0)
    big = dpo.train(config(tmp_path, "big", data, batch_size=8, **sgd_like))
    small = dpo.train(config(tmp_path, "small", data, batch_size=1, grad_accum=8, prefix_sharing=False, **sgd_like))
    a, b = weights(big), weights(small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def cli_args(data: Path, out: Path, steps: int, batch: int) -> list[str]:
    return ["dpo", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out), "--precision", "fp32",
            "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-length", "64",
            "--max-steps", str(steps), "--batch-size", str(batch)]


def test_resume_after_sigterm_reproduces_the_uninterrupted_curve(tmp_path, spawn):
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(24))
    steps = 30
    whole = dpo.train(config(tmp_path, "whole", data, max_steps=steps, batch_size=2))
    out = tmp_path / "cut"
    proc = spawn([sys.executable, "-m", "posttrain.cli", *cli_args(data, out, steps, 2)],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Resume with: posttrain dpo" in output
    assert len(log.read_text().splitlines()) < steps, "the run finished before the signal arrived"
    resumed = dpo.train(build_config(DPOConfig, str(out / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]


def test_two_processes_with_precomputed_reference_match_one_process(tmp_path, monkeypatch):
    # Same global batch (2 × 2 pairs vs 1 × 4); each process precomputes half of the
    # reference table, summed across processes, so the cache and the weights agree.
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(16))
    one = dpo.train(config(tmp_path, "one", data, max_steps=3, batch_size=4))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", *cli_args(data, out, 3, 2), "--precompute-ref"]
    result = run_group(cmd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (cached,) = (tmp_path / "cache" / "reference-logps").iterdir()
    expected = starting_logps(data)
    torch.testing.assert_close(load_file(str(cached))["ref_logps"], torch.stack(expected, -1), atol=1e-4, rtol=1e-5)
    a, b = weights(one), weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [*toy_pairs(2), {"prompt": "x", "chosen": "a"}])
    out = tmp_path / "run"
    assert cli.main(cli_args(data, out, 1, 2)) == 2
    err = capsys.readouterr().err
    assert "d.jsonl: record 3: field 'rejected': missing" in err, err
    assert not out.exists()
    good = write_jsonl(tmp_path / "g.jsonl", toy_pairs(2))
    assert cli.main([*cli_args(good, out, 1, 2), "--loss", "simpo", "--precompute-ref"]) == 2
    assert "uses no reference model" in capsys.readouterr().err
    assert cli.main([*cli_args(good, out, 1, 2), "--loss", "kto"]) == 2
    assert "loss='kto'" in capsys.readouterr().err


def test_learning_dpo_fixes_what_sft_left_ambiguous(tmp_path, one_thread):
    # Toy task: the prompt is a word; the right answer is its first letter. The SFT data was
    # written by annotators who disagreed: half the answers give the first letter, half the
    # last. SFT learns the format and both habits. DPO on pairs (first letter ≻ last letter)
    # must then raise, on words neither stage saw, (a) how often the policy puts more
    # probability on the right answer than on the wrong one and (b) greedy answers that are
    # right. When written: (a) 0.40 → 1.00, (b) 0.45 → 1.00, eval/rewards/accuracy 1.00 (≈11 s).
    from posttrain.sampling import SamplingParams, chat_replies

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(6000)})
    rng.shuffle(words)
    held, sft_words, dpo_words = words[:60], words[60:3060], words[3060:4020]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": w, "completion": w[0] if i % 2 == 0 else w[-1]}
                                                    for i, w in enumerate(sft_words)])

    def prefs(ws):
        return [{"prompt": w, "chosen": w[0], "rejected": w[-1]} for w in ws if w[0] != w[-1]]

    dpo_data, held_data = write_jsonl(tmp_path / "p.jsonl", prefs(dpo_words)), write_jsonl(tmp_path / "h.jsonl",
                                                                                         prefs(held))
    common = dict(model="tiny-random", precision="fp32", warmup_ratio=0.05, max_length=64, logging_steps=50)
    start = sft.train(build_config(SFTConfig, None, dict(common, data=str(sft_data), output_dir=str(tmp_path / "sft"),
                                                         max_steps=400, batch_size=32, lr=3e-3)))
    out = dpo.train(build_config(DPOConfig, None, dict(common, model=str(start), data=str(dpo_data),
                                                       eval_data=str(held_data), output_dir=str(tmp_path / "dpo"),
                                                       max_steps=60, batch_size=16, lr=5e-4, beta=0.1,
                                                       lr_scheduler="constant")))

    def scores(path) -> tuple[float, float]:
        model, tok = load_causal_lm(str(path)), load_tokenizer(str(path))
        pairs, _ = load_preference_pairs(str(held_data), tok, max_length=64)
        with torch.no_grad():
            chosen, rejected = sequence_logps(TokenLogprobs(model), collate_pairs(pairs, tok.pad_token_id,
                                                                                  prefix_sharing=True), "cpu")
        answers = chat_replies(model, tok, held, SamplingParams(temperature=0, max_new_tokens=4))
        return (chosen > rejected).float().mean().item(), sum(a == w[0] for a, w in zip(answers, held)) / len(held)

    (pref_before, task_before), (pref_after, task_after) = scores(start), scores(out)
    assert pref_before < 0.6 and task_before < 0.6, (pref_before, task_before)
    assert pref_after >= 0.9 and task_after >= 0.9, (pref_after, task_after)
    assert metrics(out)[-1]["eval/rewards/accuracy"] >= 0.9
