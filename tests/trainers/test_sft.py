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


def test_resume_after_sigterm_reproduces_the_uninterrupted_curve(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(24))
    steps = 40
    whole = sft.train(config(tmp_path, "whole", data, max_steps=steps, batch_size=2))
    cut = config(tmp_path, "cut", data, max_steps=steps, batch_size=2)
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--model", "tiny-random", "--data", str(data),
           "--output-dir", cut.output_dir, "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0",
           "--lr-scheduler", "constant", "--max-length", "64", "--max-steps", str(steps), "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_two_processes_match_one_process(tmp_path):
    # Same global batch (2 processes × 2 records vs 1 process × 4 records): weights after
    # 3 steps agree, since the loss is normalised by the global token count.
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(16))
    one = sft.train(config(tmp_path, "one", data, max_steps=3, batch_size=4))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "posttrain.cli", "sft", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out),
           "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant",
           "--max-length", "64", "--max-steps", "3", "--batch-size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = weights(one), weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
