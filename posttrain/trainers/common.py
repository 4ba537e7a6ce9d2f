"""Glue every trainer shares: accelerator, optimiser, schedule, data order, metrics and the
guard against non-finite updates (the run folder and checkpoints: run_folder.py; how a run
ends: stopping.py). No maths lives here (that is ops/losses/advantages), and no trainer
subclasses anything from this module: each trainer calls these helpers from its own loop.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from posttrain.config import TrainConfig
from posttrain.models.precision import resolve_precision
from posttrain.trainers import sharding
from posttrain.trainers.run_folder import checkpoints



def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """One Accelerator per run. Mixed precision is autocast (fp32 master weights)."""
    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, "cuda" if on_gpu else "cpu")
    accelerator = Accelerator(
        # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a CPU-only machine
        # and every process would train alone; with it, processes join a gloo group.
        cpu=not on_gpu,
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        # Each trainer draws its own batches from step_plan, so accelerate's sampler
        # sharding and RNG syncing of data loaders are not used.
        rng_types=[],
        # Our schedule counts optimizer steps; accelerate would otherwise step it once per
        # process per optimizer step.
        step_scheduler_with_optimizer=False,
    )
    sharding.engine(cfg, accelerator)  # a launch that would not shard as asked stops here, before any loading
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norm weights (1-D) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (CPU and CUDA). The per-tensor loop took 1.7-4.7 s
    # a step for SmolLM2-135M on 2 CPU cores, the fused kernel 0.26 s; the update is the same.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, fused=True)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    return get_scheduler(cfg.lr_scheduler, optimizer,
                         num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def total_steps(cfg: TrainConfig, n_items: int, world_size: int, print_fn=None, unit: str = "records") -> int:
    """max_steps if set, else enough global batches to cover `epochs` passes. A global batch
    larger than the data is allowed (a step then repeats items, see step_items), but said
    through print_fn: the run is not the one epoch a user may think it is."""
    batch = cfg.global_batch(world_size)
    if print_fn is not None and batch > n_items:
        print_fn(f"note: a step takes {batch} {unit} (batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum} "
                 f"× {world_size} process{'es' if world_size > 1 else ''}), more than the {n_items} loaded: "
                 f"each step repeats some of them")
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / cfg.global_batch(world_size)))


def rollout_iterations(cfg, n_prompts: int, print_fn=None) -> int:
    """PPO/GRPO/RLOO iterations: max_steps if set, else enough rollout batches of
    cfg.rollout_batch_size prompts to cover `epochs` passes. A rollout batch larger than the
    prompts repeats some of them (step_items), said through print_fn as total_steps says it."""
    if print_fn is not None and cfg.rollout_batch_size > n_prompts:
        print_fn(f"note: an iteration takes {cfg.rollout_batch_size} prompts (rollout_batch_size), more than the "
                 f"{n_prompts} loaded: each iteration repeats some of them")
    return cfg.max_steps or max(1, -(-int(cfg.epochs * n_prompts) // cfg.rollout_batch_size))


def step_items(step: int, n_items: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the records that optimizer step `step` (0-based) trains on.

    The data stream is the concatenation of one seeded permutation per epoch, cut into
    global batches; a step's batch depends only on (step, seed), never on the world size or
    on how the run was interrupted, which is what makes resume exact.
    """
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset: offset + global_batch - len(out)].tolist())
    return out


def micro_batches(items: list[int], *, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This process's micro-batches of one global batch (interleaved across processes)."""
    chunks = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    return chunks[rank::world_size]


@contextmanager
def weights_cast_once(accelerator: Accelerator, model: torch.nn.Module):
    """Around the micro-batches of one optimizer step: their forwards cast the weights once.

    Under bf16 autocast every forward casts every Linear weight to bf16 anew: autocast keeps a
    cast only until its outermost autocast region ends (about 20 ms a SmolLM2 forward here).
    This adds an outer region, disabled so that nothing outside the model's own (autocast)
    forward changes, in which the later micro-batches reuse the first one's casts: the weights
    do not change before the optimizer step, which comes after this region, where the casts are
    dropped. Forwards and gradients are bit-identical (tests/trainers/test_common.py). Not taken
    for a sharded model (its layers are gathered anew for each forward) or without autocast.
    """
    if accelerator.mixed_precision != "bf16" or sharding.is_sharded(model):
        yield
        return
    with torch.autocast(device_type=accelerator.device.type, enabled=False):
        yield


def global_sum(accelerator: Accelerator, value: float | int) -> float:
    """Sum a number over all processes (the token counts that normalise the loss)."""
    t = torch.tensor(float(value), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item()


# ---------------------------------------------------------------- metrics and progress


class RunLog:
    """metrics.jsonl (always), an optional accelerate tracker, and a progress bar."""

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, total: int, start: int, name: str):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True,
                        disable=not accelerator.is_main_process, file=sys.stderr)
        if cfg.report_to != "none":
            accelerator.init_trackers(name, config={k: v for k, v in vars(cfg).items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)

    def progress(self, n: int, shown: dict[str, str]) -> None:
        """Advance the bar by n steps; `shown` (when not empty) replaces the figures beside it. The
        figures are set first and an n of 0 draws nothing: a redraw of the bar's old count would be
        a line of its own in a log that is not a terminal."""
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        if n:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, max_grad_norm: float,
                   guard: "NonFiniteGuard", *, step: int, batch: str) -> float:
    """Clip the global gradient norm (when max_grad_norm > 0), step unless the guard skips a
    non-finite update, schedule, zero the grads. Returns the norm before clipping."""
    grad_norm = guard.apply(accelerator, model, optimizer, max_grad_norm, step=step, batch=batch)
    scheduler.step()
    return grad_norm


class Throughput:
    """Tokens per second over the steps since the last report."""

    def __init__(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate


# ---------------------------------------------------------------- non-finite updates


class NonFiniteError(ValueError):
    """A run stopped because its updates or weights held NaN or ±inf; one line, as the CLI prints it."""


MAX_SKIPPED_IN_A_ROW = 3
"""Non-finite updates in a row after which a run stops: one is an outlier batch, skipped as
fp16 loss scalers skip an overflow; three mean the model or data is broken."""


def batch_records(examples, items: list[int], source: str) -> str:
    """"records [3, 17] of SOURCE": the 1-based record numbers of examples[i] for i in items
    (each example's source_index), for messages about a batch."""
    return f"records {sorted({examples[i].source_index + 1 for i in items})} of {source}"


class NonFiniteGuard:
    """Keeps NaN and ±inf out of the weights, for every trainer alike.

    ``apply`` steps the optimizer only when the global gradient norm is finite; a skipped step
    is counted (``metrics``: "train/skipped_steps") and printed with its batch. After
    MAX_SKIPPED_IN_A_ROW in a row the run stops with NonFiniteError naming the step, the batch
    and the last good checkpoint. ``check_weights`` runs before the final save. The count starts
    at 0 in a resumed run.
    """

    def __init__(self, cfg: TrainConfig, command: str):
        self.output_dir, self.command = Path(cfg.output_dir), command
        self.skipped, self.in_a_row = 0, 0

    def apply(self, accelerator: Accelerator, model, optimizer, max_grad_norm: float, *, step: int,
              batch: str) -> float:
        """Clip to max_grad_norm (> 0) or only measure the norm (0); step if it is finite; zero
        the grads. Every process sees the same all-reduced norm, so all decide alike."""
        limit = max_grad_norm if max_grad_norm > 0 else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), limit))
        finite = math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if not finite:
            self.skipped += 1
            accelerator.print(f"step {step}: gradient norm {grad_norm} on {batch}; update skipped "
                              f"({self.skipped} so far)")
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(f"step {step}: {self.in_a_row} updates in a row had a non-finite gradient "
                                 f"(norm {grad_norm}; this one on {batch}); stopped without applying them. "
                                 f"Last good checkpoint: {self._last_checkpoint()}")
        return grad_norm

    def metrics(self) -> dict[str, int]:
        return {"train/skipped_steps": self.skipped}

    def check_weights(self, model: torch.nn.Module) -> None:
        """NonFiniteError naming the first parameter holding NaN or ±inf, if any (every process of a
        sharded model raises alike: call it on all)."""
        name = sharding.nonfinite_parameter(model)
        if name is not None:
            raise NonFiniteError(f"{self.output_dir}: parameter {name} holds NaN or ±inf; the final model "
                                 f"was not saved. Last good checkpoint: {self._last_checkpoint()}")

    def _last_checkpoint(self) -> str:
        found = checkpoints(self.output_dir)
        return (f"{found[-1]} (resume with: posttrain {self.command} --config {self.output_dir / 'config.yaml'} "
                "--resume)" if found else "none (no checkpoint was written; see --save-steps)")
