"""What every benchmark worker shares: its spec, a step clock, peak memory, the result line.

A worker is one process running one (tool, workload, model) for `warmup + timed + 1` optimizer
steps. The clock records the wall time at the *start* of every step; the duration of step k is
start(k+1) − start(k), so a step's time covers everything the tool does per step (data,
forward, backward, clip, optimizer, its own logging) and the same boundaries are used for both
tools. The first `warmup` steps are excluded; the extra last step only closes the last timed one.
The worker prints one line `BENCH {json}` that run.py collects.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from breakdown import rss_bytes


def load_spec() -> dict:
    """The JSON spec run.py passes as the first argument (a file path)."""
    return json.loads(Path(sys.argv[1]).read_text())


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process so far (Linux VmHWM), in bytes."""
    return rss_bytes("VmHWM")


class StepClock:
    """Step start times and the work counted from the batches each tool actually built."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.launched = spec["launched"]  # time.time() in run.py just before it started us
        self.starts: list[float] = []
        self.rss_at_last_step = 0
        self.counts: dict[str, int] = {}
        self.per_step: list[dict[str, int]] = []
        # run.py --profile: where the time and memory go (benchmarks/breakdown.py); else None.
        self.breakdown = None
        self.category_seconds: list[dict[str, float]] = []
        if spec.get("profile"):
            from breakdown import Breakdown

            self.breakdown = Breakdown(spec["tool"])

    @property
    def total_steps(self) -> int:
        return self.spec["warmup"] + self.spec["timed"] + 1

    def step_begin(self) -> None:
        self.starts.append(time.time())
        self.per_step.append({})
        if self.breakdown is not None:
            self.category_seconds.append(self.breakdown.snapshot())
            self.breakdown.in_warmup = len(self.starts) <= self.spec["warmup"]
        if len(self.starts) == self.total_steps:
            # Every earlier step has run in full by now; the final save (posttrain) or
            # teardown (TRL) that follows is not training and is left out of the peak.
            self.rss_at_last_step = vm_hwm_bytes()

    @contextmanager
    def timed(self, category: str):
        """Charge what runs inside to `category` ("generation", "data") when profiling."""
        if self.breakdown is None:
            yield
            return
        with self.breakdown.timed(category):
            yield

    def count(self, **amounts: int) -> None:
        """Add work units (tokens, pairs, episodes…) to the current step and the total."""
        if not self.per_step:
            raise RuntimeError("count() before the first step_begin()")
        for key, value in amounts.items():
            value = int(value)
            self.counts[key] = self.counts.get(key, 0) + value
            self.per_step[-1][key] = self.per_step[-1].get(key, 0) + value

    def result(self, **extra) -> dict:
        warmup, timed = self.spec["warmup"], self.spec["timed"]
        if len(self.starts) != self.total_steps:
            raise RuntimeError(f"expected {self.total_steps} step starts, saw {len(self.starts)}")
        durations = [b - a for a, b in zip(self.starts, self.starts[1:])]
        timed_steps = self.per_step[warmup: warmup + timed]
        timed_counts = {key: sum(step.get(key, 0) for step in timed_steps) for key in self.counts}
        profile = {}
        if self.breakdown is not None:
            first, last = self.category_seconds[warmup], self.category_seconds[-1]
            shares = {key: last[key] - first[key] for key in last}
            shares["other"] += sum(durations[warmup:]) - sum(shares.values())
            profile = {"profile": {"seconds": shares, "memory": self.breakdown.memory_split(self.rss_at_last_step)}}
        return {
            "tool": self.spec["tool"], "workload": self.spec["workload"], "model": self.spec["model"],
            "steps": len(self.starts), "warmup": warmup, "timed": timed,
            "step_seconds": durations[warmup:],
            "time_to_first_step_s": self.starts[1] - self.launched,
            "counts_total": self.counts,
            "counts_timed": timed_counts,
            "peak_rss_bytes": self.rss_at_last_step,
            "peak_rss_bytes_at_exit": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
            **profile,
            **extra,
        }


def emit(result: dict) -> None:
    print("BENCH " + json.dumps(result), flush=True)


def time_batches(trainer, clock: StepClock) -> None:
    """Charge a transformers Trainer's batch fetching (its get_batch_samples: the data loader and
    collator) to "data" when profiling."""
    fetch = trainer.get_batch_samples

    def timed_fetch(*args, **kwargs):
        with clock.timed("data"):
            return fetch(*args, **kwargs)

    trainer.get_batch_samples = timed_fetch


def watch_autocast(model) -> dict[str, set]:
    """Whether bf16 autocast is on in the model's forwards, seen at its first Linear layer:
    {"grad": {...}, "no_grad": {...}} (training forwards / generation, reference, scoring)."""
    import torch

    seen: dict[str, set] = {}
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, args):
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        seen.setdefault(key, set()).add(torch.is_autocast_enabled("cpu"))

    linear.register_forward_pre_hook(hook)
    return seen


def autocast_report(seen: dict[str, set]) -> dict[str, list[bool]]:
    return {key: sorted(values) for key, values in seen.items()}


def count_parameters(model) -> int:
    """Distinct parameters (a tied input/output embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lowercase_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The GRPO/RLOO benchmarks' reward, the same Python function on both sides: the share of a
    response's characters that are lowercase letters (0 for an empty response). Deterministic
    and cheap, so the rows time the trainers, not a reward model."""
    return [sum(ch.islower() for ch in text) / len(text) if text else 0.0 for text in responses]
