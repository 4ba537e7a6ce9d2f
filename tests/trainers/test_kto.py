"""KTO trainer: both reference modes, the mismatched pairing, accumulation, resume after SIGTERM,
bad input, and a learning test on a toy task."""

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

from process_groups import run_group
from posttrain import cli
from posttrain.config import ConfigError, KTOConfig, SFTConfig, build_config
from posttrain.data import load_labelled_completions
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.pairs import sequence_logps
from posttrain.trainers import kto, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_feedback(n: int, seed: int = 0) -> list[dict]:
    """Unpaired records of different lengths: the reversed word is good, the doubled word bad."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(n)]
    return [{"prompt": f"reverse {w}", "completion": w[::-1] if i % 2 else w + w, "label": bool(i % 2)}
            for i, w in enumerate(words)]


def config(tmp_path: Path, name: str, data: Path, **kw) -> KTOConfig:
    base = dict(model="tiny-random", data=str(data), output_dir=str(tmp_path / name), precision="fp32",
                lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", max_length=64)
    base.update(kw)
    return build_config(KTOConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_mismatched_pairing_is_trls_rotation():
    # TRL: KL_completion_ids = [completions[-1]] + completions[:-1] within a batch.
    assert kto.with_mismatched([7, 3, 5, 9]) == [(7, 9), (3, 7), (5, 3), (9, 5)]


def test_batch_rows_hold_own_and_mismatched_completions(tmp_path):
    tok = load_tokenizer("tiny-random")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "x", "label": True},
                                              {"prompt": "cd", "completion": "yyyyyy", "label": False}])
    examples, _ = load_labelled_completions(str(data), tok, max_length=64)
    # Room for 4 reply tokens after example 0's prompt ("x<|im_end|>" is 2 tokens).
    data = kto.ExampleSet(examples, max_length=examples[0].length + 2)
    batch = data.batch(kto.with_mismatched([0, 1]), tok.pad_token_id)
    assert batch.labels.tolist() == [True, False]
    own = [tok.decode(ids[mask]) for ids, mask in zip(batch.own.input_ids, batch.own.loss_mask)]
    assert own == ["x<|im_end|>", "yyyyyy<|im_end|>"]
    mismatched = [tok.decode(ids[mask]) for ids, mask in zip(batch.both.input_ids, batch.both.rejected_mask)]
    # Example 0 ("ab") gets example 1's completion cut to its first 4 tokens; example 1 gets example 0's.
    assert mismatched == ["yyyy", "x<|im_end|>"]


@pytest.fixture
def captured(monkeypatch):
    """The reference objects the trainer builds."""
    made = []

    def recording(cls):
        class Recorded(cls):
            def __init__(self, *args):
                super().__init__(*args)
                made.append(self)

        Recorded.__name__ = cls.__name__
        return Recorded

    for name in ("FrozenCopy", "AdaptersOff"):
        monkeypatch.setattr(kto, name, recording(getattr(kto, name)))
    return made


@pytest.mark.parametrize("mode", ["frozen_copy", "adapters_off"])
def test_few_steps_train_the_policy_only(tmp_path, tiny_path, captured, mode):
    data = write_jsonl(tmp_path / "d.jsonl", toy_feedback(8))
    held = write_jsonl(tmp_path / "e.jsonl", toy_feedback(4, seed=1))
    extra = dict(lora_r=4, lora_alpha=8.0) if mode == "adapters_off" else {}
    out = kto.train(config(tmp_path, "run", data, eval_data=str(held), max_steps=2, batch_size=8, **extra))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2]
    for key in ("loss/train", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                "logps/rejected", "kl/z0"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows[:2]), key
        assert torch.isfinite(torch.tensor(rows[2]["eval/" + key.replace("/train", "")])), key
    # Before the first update the policy is the reference: rewards 0, z₀ = 0, every loss λ/2.
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["kl/z0"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["loss/train"] == pytest.approx(0.5, abs=1e-6)
    start, after = weights(tiny_path), weights(out)
    assert any(not torch.equal(start[k], after[k]) for k in start), "policy weights did not change"

    # The reference still computes the starting model's log-probs, on own and mismatched completions.
    (reference,) = captured
    assert type(reference).__name__ == {"frozen_copy": "FrozenCopy", "adapters_off": "AdaptersOff"}[mode]
    tok = load_tokenizer("tiny-random")
    examples, _ = load_labelled_completions(str(data), tok, max_length=64)
    batch = kto.ExampleSet(examples, 64).batch(kto.with_mismatched(list(range(8))), tok.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps(TokenLogprobs(load_causal_lm("tiny-random")), batch.both, "cpu")
    got = reference.logps(batch.both)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_pairs_train_as_one_desirable_and_one_undesirable_example(tmp_path, capsys):
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + "x"}
             for r in toy_feedback(4)]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    out = kto.train(config(tmp_path, "run", data, max_steps=1, batch_size=8, desirable_weight=1.2))
    printed = capsys.readouterr().out
    assert f"loaded 8 examples from {data} (4 records)" in printed
    assert "4 desirable and 4 undesirable examples: λ_D·n_D / (λ_U·n_U) = 1.20" in printed
    (row,) = metrics(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin"} <= set(row)


def test_accumulation_equals_one_big_batch(tmp_path):
    # 1 micro-batch of 8 examples vs 8 of 1: z₀ is estimated on the whole global batch and the
    # loss is Σ over examples / the global count, so the updates must match to rounding. With
    # eps ≫ |g| Adam's first step is lr·g/eps, so the weights show the gradient itself. Later
    # steps start from a policy that moved; with 6 of 8 examples desirable, the mismatched
    # completions gain probability too, so z₀ > 0 there and its estimate matters.
    records = toy_feedback(8)
    for record in records[:6]:
        record["label"] = True
    data = write_jsonl(tmp_path / "d.jsonl", records)
    sgd_like = dict(max_steps=3, lr=1.0, adam_eps=1.0, max_grad_norm=0.0, undesirable_weight=1.5)
    big = kto.train(config(tmp_path, "big", data, batch_size=8, **sgd_like))
    small = kto.train(config(tmp_path, "small", data, batch_size=1, grad_accum=8, **sgd_like))
    for x, y in zip(metrics(big), metrics(small)):
        assert y["kl/z0"] == pytest.approx(x["kl/z0"], abs=1e-5) and y["loss/train"] == pytest.approx(x["loss/train"])
    assert metrics(big)[2]["kl/z0"] > 1
    a, b = weights(big), weights(small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def cli_args(data: Path, out: Path, steps: int, batch: int) -> list[str]:
    return ["kto", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out), "--precision", "fp32",
            "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-length", "64",
            "--max-steps", str(steps), "--batch-size", str(batch)]


def test_resume_after_sigterm_reproduces_the_uninterrupted_curve(tmp_path, spawn):
    data = write_jsonl(tmp_path / "d.jsonl", toy_feedback(24))
    steps = 30
    whole = kto.train(config(tmp_path, "whole", data, max_steps=steps, batch_size=2))
    out = tmp_path / "cut"
    proc = spawn([sys.executable, "-m", "posttrain.cli", *cli_args(data, out, steps, 2)],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Resume with: posttrain kto" in output
    assert len(log.read_text().splitlines()) < steps, "the run finished before the signal arrived"
    resumed = kto.train(build_config(KTOConfig, str(out / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]
        assert y["kl/z0"] == pytest.approx(x["kl/z0"], abs=1e-6), x["step"]


def test_two_processes_match_one_process(tmp_path):
    # Same global batch (2 × 2 examples vs 1 × 4): z₀ is all-reduced over both processes' mismatched
    # pairs and the loss normalised by the global example count, so the weights agree. Steps are
    # SGD-like, as in the accumulation test; large ones and mostly desirable examples make z₀ > 0
    # from the second step on.
    records = toy_feedback(16)
    for record in records[:10]:
        record["label"] = True
    data = write_jsonl(tmp_path / "d.jsonl", records)
    one = kto.train(config(tmp_path, "one", data, max_steps=3, batch_size=4, lr=1.0, adam_eps=1.0,
                           max_grad_norm=0.0))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port of its own, so concurrent test runs on one machine cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", *cli_args(data, out, 3, 2), "--lr", "1", "--adam-eps", "1",
           "--max-grad-norm", "0"]
    result = run_group(cmd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for x, y in zip(metrics(one), metrics(out)):
        assert y["kl/z0"] == pytest.approx(x["kl/z0"], abs=1e-5) and y["loss/train"] == pytest.approx(x["loss/train"])
    assert metrics(one)[2]["kl/z0"] > 1
    a, b = weights(one), weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [*toy_feedback(2), {"prompt": "x", "completion": "a", "label": "yes"}])
    out = tmp_path / "run"
    assert cli.main(cli_args(data, out, 1, 2)) == 2
    err = capsys.readouterr().err
    assert "d.jsonl: record 3: field 'label': expected true or false, got string 'yes'" in err, err
    assert not out.exists()
    good = write_jsonl(tmp_path / "g.jsonl", toy_feedback(2))
    assert cli.main(cli_args(good, out, 1, 1)) == 2
    assert "batch_size × grad_accum × processes = 1 must be ≥ 2" in capsys.readouterr().err
    assert not out.exists()
    for flag, value in (("--beta", "0"), ("--undesirable-weight", "-1"), ("--pairing", "best")):
        assert cli.main([*cli_args(good, out, 1, 2), flag, value]) == 2
        assert f"{flag[2:].replace('-', '_')}=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="desirable_weight=0.0 must be > 0"):
        build_config(KTOConfig, None, {"data": "x", "desirable_weight": 0.0})
    one_kind = write_jsonl(tmp_path / "up.jsonl", [{"prompt": w, "completion": w, "label": True} for w in ("ab", "cd")])
    assert cli.main(cli_args(one_kind, out, 1, 2)) == 2
    assert "up.jsonl: 2 desirable and 0 undesirable examples; KTO needs some of each" in capsys.readouterr().err
    assert not out.exists()


def test_learning_kto_prefers_the_desirable_habit(tmp_path):
    # Toy task: the prompt is a word; the right answer is its first letter. The SFT data was
    # written by annotators who disagreed: half the answers give the first letter, half the
    # last, so SFT learns the format and both habits. KTO then sees unpaired thumbs: for some
    # words a first-letter answer marked good, for other words a last-letter answer marked bad.
    # On words neither stage saw it must raise (a) how often the policy puts more probability on
    # the first letter than on the last and (b) greedy answers that are right.
    # When written: (a) 0.47 → 1.00, (b) 0.47 → 1.00, eval/rewards/margin 0.61 (≈11 s quiet).
    from posttrain.sampling import SamplingParams, chat_replies

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(6000)})
    rng.shuffle(words)
    held, sft_words, kto_words = words[:60], words[60:3060], words[3060:4020]
    held = [w for w in held if w[0] != w[-1]]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": w, "completion": w[0] if i % 2 == 0 else w[-1]}
                                                    for i, w in enumerate(sft_words)])
    thumbs = [{"prompt": w, "completion": w[0], "label": True} if i % 2 == 0 else
              {"prompt": w, "completion": w[-1], "label": False}
              for i, w in enumerate(kto_words) if w[0] != w[-1]]
    kto_data = write_jsonl(tmp_path / "k.jsonl", thumbs)
    held_data = write_jsonl(tmp_path / "h.jsonl", [{"prompt": w, "chosen": w[0], "rejected": w[-1]} for w in held])
    common = dict(model="tiny-random", precision="fp32", warmup_ratio=0.05, max_length=64, logging_steps=50)
    start = sft.train(build_config(SFTConfig, None, dict(common, data=str(sft_data), output_dir=str(tmp_path / "sft"),
                                                         max_steps=300, batch_size=32, lr=3e-3)))
    out = kto.train(build_config(KTOConfig, None, dict(common, model=str(start), data=str(kto_data),
                                                       eval_data=str(held_data), output_dir=str(tmp_path / "kto"),
                                                       max_steps=60, batch_size=16, lr=5e-4, beta=0.1,
                                                       lr_scheduler="constant")))

    def scores(path) -> tuple[float, float]:
        model, tok = load_causal_lm(str(path)), load_tokenizer(str(path))
        # The held-out pairs load as (first letter, True), (last letter, False) per word.
        examples, _ = load_labelled_completions(str(held_data), tok, max_length=64)
        batch = kto.ExampleSet(examples, 64).batch([(i, i) for i in range(len(examples))], tok.pad_token_id)
        with torch.no_grad():
            logps = kto.completion_logps(TokenLogprobs(model), batch.own, "cpu")
        answers = chat_replies(model, tok, held, SamplingParams(temperature=0, max_new_tokens=4))
        return (logps[0::2] > logps[1::2]).float().mean().item(), sum(a == w[0] for a, w in zip(answers, held)) / len(held)

    (pref_before, task_before), (pref_after, task_after) = scores(start), scores(out)
    assert pref_before < 0.6 and task_before < 0.6, (pref_before, task_before)
    assert pref_after >= 0.9 and task_after >= 0.9, (pref_after, task_after)
    final = metrics(out)[-1]
    assert final["eval/rewards/margin"] > 0.3 and final["eval/rewards/chosen"] > final["eval/rewards/rejected"]
