"""SFT trainer: few steps, accumulation = one big batch, exact resume, SIGTERM, output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from process_groups import run_group
from posttrain.config import SFTConfig, build_config
from posttrain.trainers import sft

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """Records of deliberately different lengths, so per-token normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 9, (1,), generator=g))
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (k,), generator=g))
        out.append({"prompt": f"reverse {word}", "completion": word[::-1]})
    return out


def config(tmp_path: Path, name: str, data: Path, **kw) -> SFTConfig:
    base = dict(model="tiny-random", data=str(data), output_dir=str(tmp_path / name), precision="fp32",
                lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", max_length=64)
    base.update(kw)
    return build_config(SFTConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_few_steps_train_and_save_a_loadable_model(tmp_path, tiny_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(16))
    out = sft.train(config(tmp_path, "run", data, max_steps=3, batch_size=4))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss/train"])) for r in rows)
    assert rows[0]["perf/tokens_per_s"] > 0
    start = load_file(str(tiny_path / "model.safetensors"))
    after = weights(out)
    assert any(not torch.equal(start[k], after[k]) for k in start)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.vocab_size == len(tok)
    assert (out / "config.yaml").is_file()


def test_accumulation_equals_one_big_batch(tmp_path):
    # 1 micro-batch of 8 vs 8 micro-batches of 1: the per-token normaliser is the global
    # count, so the single update must match to float rounding. Adam's first step is
    # ≈ lr·sign(g) and would hide a wrongly weighted gradient; with eps ≫ |g| the update is
    # lr·g/eps, so the weights show the gradient itself.
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    sgd_like = dict(max_steps=1, lr=1.0, adam_eps=1.0, max_grad_norm=0.0)
    big = sft.train(config(tmp_path, "big", data, batch_size=8, grad_accum=1, **sgd_like))
    small = sft.train(config(tmp_path, "small", data, batch_size=1, grad_accum=8, **sgd_like))
    a, b = weights(big), weights(small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert metrics(big)[0]["loss/train"] == pytest.approx(metrics(small)[0]["loss/train"], abs=1e-6)


def test_resume_after_sigterm_reproduces_the_uninterrupted_curve(tmp_path, spawn):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(24))
    steps = 40
    whole = sft.train(config(tmp_path, "whole", data, max_steps=steps, batch_size=2))
    cut = config(tmp_path, "cut", data, max_steps=steps, batch_size=2)
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--model", "tiny-random", "--data", str(data),
           "--output-dir", cut.output_dir, "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0",
           "--lr-scheduler", "constant", "--max-length", "64", "--max-steps", str(steps), "--batch-size", "2"]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = Path(cut.output_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Resume with: posttrain sft" in output
    stopped_at = len(log.read_text().splitlines())
    assert stopped_at < steps, "the run finished before the signal arrived"
    resumed = sft.train(build_config(SFTConfig, str(Path(cut.output_dir) / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    sft.train(config(tmp_path, "run", data, max_steps=2, batch_size=4, save_steps=1))
    with pytest.raises(ValueError, match="--resume"):
        sft.train(config(tmp_path, "run", data, max_steps=2, batch_size=4))


def test_a_checkpoint_of_a_tied_head_prints_no_removed_tensor_notice(tmp_path, capsys, caplog):
    # accelerate warns "Removed shared tensor {...} while saving" for the tied head, on the
    # progress bar's line; resuming is exact (above), so the notice is dropped.
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    sft.train(config(tmp_path, "run", data, max_steps=2, batch_size=4, save_steps=1))
    assert list((tmp_path / "run" / "checkpoints").iterdir())
    assert "Removed shared tensor" not in capsys.readouterr().err
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_two_processes_match_one_process(tmp_path):
    # Same global batch (2 processes × 2 records vs 1 process × 4 records): weights after
    # 3 steps agree, since the loss is normalised by the global token count.
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(16))
    one = sft.train(config(tmp_path, "one", data, max_steps=3, batch_size=4))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", "sft", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out),
           "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant",
           "--max-length", "64", "--max-steps", "3", "--batch-size", "2"]
    result = run_group(cmd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = weights(one), weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def reverse_records(n: int, rng) -> list[dict]:
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        out.append({"prompt": word, "completion": word[::-1]})
    return out


def test_learning_reverses_held_out_strings(tmp_path):
    # Proof that the loop trains: the random tiny model cannot reverse a string; 300 steps of
    # SFT on 3,000 examples (≈4 s here) must take it to ≥ 90 % exact answers on 100 strings it
    # never saw (it reached 100 % when this test was written).
    import random

    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.sampling import SamplingParams, chat_replies

    rng = random.Random(0)
    train = reverse_records(3000, rng)
    seen = {r["prompt"] for r in train}
    held = [r for r in reverse_records(400, rng) if r["prompt"] not in seen][:100]
    data = write_jsonl(tmp_path / "train.jsonl", train)

    def accuracy(model_path) -> float:
        model, tok = load_causal_lm(str(model_path)), load_tokenizer(str(model_path))
        answers = chat_replies(model, tok, [r["prompt"] for r in held], SamplingParams(temperature=0, max_new_tokens=10))
        return sum(a == r["completion"] for a, r in zip(answers, held)) / len(held)

    out = sft.train(config(tmp_path, "run", data, max_steps=300, batch_size=32, lr=3e-3, warmup_ratio=0.05,
                           lr_scheduler="cosine", logging_steps=50))
    assert len(held) == 100
    assert accuracy("tiny-random") == 0.0
    assert accuracy(out) >= 0.9


def test_packed_rows_give_the_same_loss_as_unpacked(tmp_path, tiny_tokenizer):
    # One step over all 32 records, padded one per row vs packed several per row: the same
    # loss tokens, and (block-diagonal attention, restarted positions) the same loss.
    from posttrain.data import load_sft_examples, pack_examples

    data = write_jsonl(tmp_path / "d.jsonl", toy_records(32))
    examples, _ = load_sft_examples(str(data), tiny_tokenizer, max_length=256)
    rows = len(pack_examples(examples, 256))
    assert rows < 32
    plain = metrics(sft.train(config(tmp_path, "plain", data, max_steps=1, batch_size=32, max_length=256)))[0]
    packed = metrics(sft.train(config(tmp_path, "packed", data, max_steps=1, batch_size=rows, packing=True,
                                      max_length=256)))[0]
    assert packed["train/loss_tokens"] == plain["train/loss_tokens"]
    assert packed["loss/train"] == pytest.approx(plain["loss/train"], abs=1e-5)


def test_lora_trains_adapters_and_saves_merged_or_separate(tmp_path, tiny_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    merged = sft.train(config(tmp_path, "merged", data, max_steps=2, batch_size=4, lora_r=4, lr=1e-2))
    start = load_file(str(tiny_path / "model.safetensors"))
    after = weights(merged)
    changed = [k for k in start if not torch.equal(start[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linears move
    adapter = sft.train(config(tmp_path, "adapter", data, max_steps=2, batch_size=4, lora_r=4, lr=1e-2,
                               merge_lora=False))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()


def test_eval_data_is_scored_at_the_end(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    held = write_jsonl(tmp_path / "e.jsonl", toy_records(4, seed=1))
    out = sft.train(config(tmp_path, "run", data, eval_data=str(held), max_steps=2, batch_size=4, eval_steps=1))
    evals = [r for r in metrics(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval/loss"] > 0 for r in evals)


def test_bad_record_stops_before_training_and_writes_nothing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 2: field 'completion'"):
        sft.train(config(tmp_path, "run", data, max_steps=1))
    assert not (tmp_path / "run").exists()


def test_checkpoints_keep_the_newest_and_tensorboard_logs(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    out = sft.train(config(tmp_path, "run", data, max_steps=5, batch_size=4, save_steps=1, save_total_limit=2,
                           report_to="tensorboard"))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["checkpoint-0000003", "checkpoint-0000004"]  # none at the last step: the model is saved
    state = json.loads((out / "checkpoints" / kept[-1] / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_an_error_mid_run_keeps_the_last_step_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    # Step 4's batch fails (a collator error standing for a reward function that raises): the state
    # of step 3 is saved though save_steps is 0, and resuming once the cause is gone reproduces the
    # uninterrupted run.
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(12))
    whole = sft.train(config(tmp_path, "whole", data, max_steps=6, batch_size=2))
    calls, collate = [], sft.collate

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("collator failed")
        return collate(*args)

    monkeypatch.setattr(sft, "collate", failing)
    cfg = config(tmp_path, "cut", data, max_steps=6, batch_size=2)
    with pytest.raises(RuntimeError, match="collator failed"):
        sft.train(cfg)
    err = capsys.readouterr().err
    assert f"the run failed after step 3; its state is in {tmp_path / 'cut' / 'checkpoints'}" in err
    assert "resume with: posttrain sft --config" in err
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["checkpoint-0000003"]
    monkeypatch.setattr(sft, "collate", collate)
    resumed = sft.train(build_config(SFTConfig, str(tmp_path / "cut" / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]
