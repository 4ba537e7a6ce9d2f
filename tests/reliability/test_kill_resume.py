"""Fault test (issue 15, Proof): an SFT run killed with SIGKILL at seeded-random points — at
start-up, mid-step, and while a checkpoint is being written — and restarted with --resume each
time, always resumes from a complete checkpoint and ends with the weights and metrics of the run
that was never interrupted.

Each attempt is a real process killed with SIGKILL. Importing torch and transformers takes ~8 s
here, so the attempts are forked from one warm process (`ZYGOTE`) that has imported them once:
an attempt then costs its own start-up (model, data, checkpoint) only. The zygote runs in a
process group of its own (the `spawn` fixture), so every attempt dies with it at teardown.
"""

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

from posttrain.trainers.run_folder import FINISHED, checkpoints

REPO = Path(__file__).resolve().parents[2]

ZYGOTE = r"""
import json, os, sys
import posttrain.cli, posttrain.trainers.sft  # the slow imports, paid once
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:  # reap an attempt: its exit code, or minus the signal that killed it
        _, status = os.waitpid(request["wait"], 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 1
        try:
            code = posttrain.cli.main(request["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
"""

CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                    "trainer_state.json", "config.yaml"}
"""What a complete checkpoint of a single-process full-weight SFT run holds."""

STEPS = 40


class Zygote:
    """Forks `posttrain` attempts from one process that has already imported the trainer."""

    def __init__(self, spawn):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = spawn([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=REPO, env=env)

    def start(self, argv: list[str], log: Path) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self, pid: int) -> int:
        self.proc.stdin.write(json.dumps({"wait": pid}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())


def sft_argv(data: Path, out: Path, *, resume: bool) -> list[str]:
    return ["sft", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out), "--precision", "fp32",
            "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-length", "64",
            "--max-steps", str(STEPS), "--batch-size", "2", "--save-steps", "1", "--save-total-limit", "2",
            *(["--resume"] if resume else [])]


def assert_complete(checkpoint: Path) -> int:
    """Every file of `checkpoint` is there and readable; returns its step."""
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES, sorted(checkpoint.iterdir())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"checkpoint-{state['step']:07d}"
    assert load_file(str(checkpoint / "model.safetensors"))
    torch.load(checkpoint / "optimizer.bin", weights_only=True)
    return state["step"]


def running(pid: int) -> bool:
    """The forked attempt `pid` has not exited (a zombie, not yet reaped, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, pid: int, timeout: float = 60.0) -> None:
    """Poll `condition` every millisecond until true; fail if attempt `pid` ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert running(pid) and time.monotonic() < deadline, "attempt ended or stalled before its kill point"
        time.sleep(0.001)


def interrupted_writes(out: Path) -> set[tuple[str, int]]:
    """(name, mtime) of every checkpoint folder still being written (or left half-written)."""
    return {(p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").glob("*.tmp")}


def metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes_from_a_complete_checkpoint(tmp_path, spawn):
    rng = random.Random(15)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {w}", "completion": w[::-1]}) + "\n" for w in words))
    zygote = Zygote(spawn)

    whole = tmp_path / "whole"
    pid = zygote.start(sft_argv(data, whole, resume=False), tmp_path / "whole.log")
    assert zygote.wait(pid) == 0, (tmp_path / "whole.log").read_text()[-3000:]

    out = tmp_path / "cut"
    kills, mid_write, resumed_from = 0, 0, []
    for attempt in range(40):
        found = checkpoints(out)
        newest = assert_complete(found[-1]) if found else None
        log = tmp_path / f"attempt-{attempt}.log"
        before = interrupted_writes(out)
        pid = zygote.start(sft_argv(data, out, resume=newest is not None), log)
        # Kill points, each drawn at random: any moment of start-up or training; just after a
        # given step was logged; as soon as a checkpoint write is seen under way.
        kind = rng.choice(["anytime", "after-step", "mid-write", "mid-write"]) if kills < 12 else "never"
        if kind == "anytime":
            time.sleep(rng.uniform(0.0, 0.5))
        elif kind == "after-step":
            target = (newest or 0) + rng.randint(1, 3)
            wait_for(lambda: target in metric_steps(out) or (out / FINISHED).exists(), pid)
            time.sleep(rng.uniform(0.0, 0.02))
        elif kind == "mid-write":
            root = out / "checkpoints"
            first = (newest or 0) + 1 + rng.randint(0, 2)
            wait_for(lambda: (root / f"checkpoint-{first:07d}.tmp").exists() or (out / FINISHED).exists(), pid)
            time.sleep(rng.uniform(0.0, 0.004))
        if kind != "never":
            os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        text = log.read_text()
        if newest is not None and "resumed from" in text:
            line = next(x for x in text.splitlines() if x.startswith("resumed from"))
            resumed_from.append(line)
            assert line == f"resumed from {found[-1]} at step {newest}", (line, newest)
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"attempt {attempt} ({kind}) exited {code}:\n{text[-3000:]}"
        kills += 1
        mid_write += bool(interrupted_writes(out) - before)
        print(f"attempt {attempt}: {kind}, killed with checkpoints {[p.name[-3:] for p in checkpoints(out)]}, "
              f"metrics to step {max(metric_steps(out), default=0)}, interrupted writes {interrupted_writes(out) - before}")
    else:
        pytest.fail("the run never finished")

    assert kills >= 10, kills
    assert mid_write >= 3, f"only {mid_write} of {kills} kills interrupted a checkpoint write"
    assert len(resumed_from) >= 5, resumed_from
    # The finished run equals the uninterrupted one: every metric row once, the same losses, the
    # same final weights.
    assert metric_steps(out) == list(range(1, STEPS + 1))
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for row in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()):
        assert rows[row["step"]]["loss/train"] == pytest.approx(row["loss/train"], abs=1e-6), row["step"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((out / FINISHED).read_text())["step"] == STEPS
