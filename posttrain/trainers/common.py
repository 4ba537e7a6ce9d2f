"""Glue every trainer shares: accelerator, optimiser, schedule, data order, checkpoints,
metrics and signals. No maths lives here (that is ops/losses/advantages), and no trainer
subclasses anything from this module: each trainer calls these helpers from its own loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from posttrain.config import TrainConfig, to_yaml
from posttrain.models.precision import resolve_precision
from posttrain.trainers import sharding

CHECKPOINT_PREFIX = "checkpoint-"


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


# ---------------------------------------------------------------- checkpoints


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _not_the_tied_head_notice(record: logging.LogRecord) -> bool:
    """False for accelerate's "Removed shared tensor {...} while saving" (the LM head tied to the
    embedding is stored once). --resume loads into the same model, whose weights are still tied,
    and resumes bit for bit (tests/trainers); the notice only broke the progress bar's line."""
    return "Removed shared tensor" not in record.getMessage()  # after accelerate's "[RANK 0] "


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int, extra: dict | None = None) -> Path:
    """Model, optimizer, scheduler and RNG states via accelerate (sharded runs: a distributed
    checkpoint, see sharding.save_state), plus our own step counter, the run's config, its data
    fingerprint, the process count and the global batch (what --resume checks against).

    Written to `checkpoint-N.tmp` and renamed when complete, so a crash mid-write never
    leaves a folder that --resume would pick up. Keeps the newest `save_total_limit`.
    """
    root = Path(cfg.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if cfg.sharding == "fsdp":
        sharding.save_state(accelerator, tmp)
    else:
        notices = logging.getLogger("accelerate.utils.other")
        notices.addFilter(_not_the_tied_head_notice)
        try:
            accelerator.save_state(str(tmp))
        finally:
            notices.removeFilter(_not_the_tied_head_notice)
    accelerator.wait_for_everyone()   # every process's part is written before the folder is renamed
    if accelerator.is_main_process:
        fingerprint = json.loads((Path(cfg.output_dir) / FINGERPRINT).read_text())
        state = {"step": step, "world_size": accelerator.num_processes,
                 "global_batch": cfg.global_batch(accelerator.num_processes), "fingerprint": fingerprint,
                 **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(to_yaml(run_config(cfg)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(cfg.output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume_from_checkpoint(accelerator: Accelerator, cfg: TrainConfig) -> dict:
    """Load the newest checkpoint into the prepared objects; returns its trainer state.
    check_output_dir has already checked that the checkpoint belongs to this run."""
    found = checkpoints(cfg.output_dir)
    if not found:
        raise ValueError(f"--resume: no checkpoint under {Path(cfg.output_dir) / 'checkpoints'}")
    latest = found[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    if cfg.sharding == "fsdp":
        sharding.load_state(accelerator, latest, saved_world=state["world_size"], step=state["step"], seed=cfg.seed)
    else:
        accelerator.load_state(str(latest))
    accelerator.print(f"resumed from {latest} at step {state['step']}")
    return state


# ---------------------------------------------------------------- the run folder

FINGERPRINT = "fingerprint.json"
"""The run's data fingerprint (data_fingerprint), copied into every checkpoint."""
FINISHED = "finished.json"
"""Written last by a completed run: the final model's step and the files it consists of."""
FINAL_TMP = "final-model.tmp"
"""Where the final model is written before its files are moved into the run folder."""
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", FINGERPRINT, FINISHED)
"""Files a run writes besides its model and checkpoints (--overwrite removes them)."""
MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin")
"""Files that make a folder a model folder: a run must not write its model over one unasked."""
SAFE_TO_CHANGE = ("max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "samples_steps",
                  "report_to", "resume", "overwrite", "output_dir", "compile")
"""Keys a resumed run may change: they decide how long it runs, what it reports and how a step is
computed, not the updates (compile changes them by float rounding only, models.compile).
max_steps may change only between two step counts (not to or from 0, "derive from epochs")."""


def run_config(cfg: TrainConfig) -> TrainConfig:
    """The config as saved in the run folder: without the one-off resume / overwrite switches, so
    `--config OUT/config.yaml` starts nothing destructive and `--resume` is always explicit."""
    return dataclasses.replace(cfg, resume=False, overwrite=False)


def source_fingerprint(source: str) -> str:
    """sha256 of what a data source holds: a file's bytes, or a folder's files (relative names and
    contents); a source that is not a local path (a hub id) can only be named: `name:SOURCE`."""
    path = Path(source)
    match = re.fullmatch(r"(?P<path>.+):(?P<split>[A-Za-z_][\w.-]*(\[[^\]]*\])?)", source)
    split = ""
    if not path.exists() and match and Path(match["path"]).exists():
        path, split = Path(match["path"]), match["split"]
    if not path.exists():
        return f"name:{source}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(split.encode())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return f"sha256:{digest.hexdigest()}"


def data_fingerprint(cfg: TrainConfig) -> dict[str, str]:
    """Fingerprints of the training and held-out data; they stand for `data` and `eval_data` when
    a resumed or repeated run is compared with the one in its folder (a moved file is the same data)."""
    return {"data": source_fingerprint(cfg.data),
            "eval_data": source_fingerprint(cfg.eval_data) if cfg.eval_data else ""}


def config_differences(saved: dict, current: dict, saved_fingerprint: dict | None,
                       current_fingerprint: dict, also_safe: tuple[str, ...] = ()) -> list[str]:
    """`key (saved → current)` for every key that makes `current` another run than `saved`.

    saved / current: configs as plain mappings (YAML). Keys in SAFE_TO_CHANGE and `also_safe` do
    not count; data and eval_data are compared by fingerprint when `saved_fingerprint` is known,
    by name else.
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        if (key in SAFE_TO_CHANGE or key in also_safe
                or (saved_fingerprint is not None and key in ("data", "eval_data"))):
            continue
        if saved.get(key, "(absent)") != current.get(key, "(absent)"):
            out.append(f"{key} ({saved.get(key, '(absent)')!r} → {current.get(key, '(absent)')!r})")
    if (saved.get("max_steps", 0) == 0) != (current.get("max_steps", 0) == 0):
        out.append(f"max_steps ({saved.get('max_steps')!r} → {current.get('max_steps')!r})")
    for key in ("data", "eval_data"):
        if saved_fingerprint is not None and saved_fingerprint.get(key) != current_fingerprint[key]:
            out.append(f"{key} ({current.get(key)!r}: {short(saved_fingerprint.get(key))} → "
                       f"{short(current_fingerprint[key])})")
    return out


def short(fingerprint: str | None) -> str:
    """A fingerprint cut to `sha256:` and 12 hex digits, for messages."""
    if not fingerprint:
        return "none"
    return fingerprint[:19] + "…" if len(fingerprint) > 19 and fingerprint.startswith("sha256:") else fingerprint


def check_output_dir(cfg: TrainConfig, world_size: int) -> dict[str, str]:
    """Refuse, before anything is written, an output folder this run must not use; returns the data
    fingerprint for prepare_output_dir.

    A fresh run refuses a folder holding checkpoints, a finished run or any model, or the start of
    a different run that logged a step, unless cfg.overwrite. A resumed run needs a checkpoint written by the same run:
    the same config except SAFE_TO_CHANGE, the same data, the same process count, and max_steps
    not below the checkpoint's step. A sharded checkpoint (sharding=fsdp) reshards, so it may
    resume on another process count, with batch_size and grad_accum changed to keep its global
    batch. Every process checks, so every process raises alike.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={cfg.output_dir!r} is a file, not a folder")
    if Path(cfg.model).expanduser().resolve() == out.resolve():
        raise ValueError(f"output_dir={cfg.output_dir!r} is the folder of the model it trains; choose another")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run or replace it")
    fingerprint = data_fingerprint(cfg)
    current = yaml.safe_load(to_yaml(cfg))
    found = checkpoints(out)
    if cfg.resume:
        if not found:
            raise ValueError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        latest = found[-1]
        state = json.loads((latest / "trainer_state.json").read_text())
        saved = yaml.safe_load((latest / "config.yaml").read_text())
        saved.setdefault("sharding", "none")  # a checkpoint written before the field existed was not sharded
        reshard = cfg.sharding == "fsdp" and saved["sharding"] == "fsdp"
        differences = config_differences(saved, current, state.get("fingerprint"), fingerprint,
                                         also_safe=BATCH_SPLIT if reshard else ())
        moved = state.get("world_size", world_size) != world_size and not reshard
        if moved:
            differences.append(f"processes ({state['world_size']} → {world_size})")
        if differences:
            raise ValueError(f"--resume: {latest} was written by another run; it differs in "
                             f"{', '.join(differences)}. Resume with its settings (--config {out / 'config.yaml'}) "
                             "or start a new run in another --output-dir"
                             + (" (only a sharding=fsdp checkpoint resumes on another process count)" if moved else ""))
        if reshard and cfg.global_batch(world_size) != state["global_batch"]:
            raise ValueError(global_batch_error(latest, state, cfg, world_size))
        if 0 < cfg.max_steps < state["step"]:
            raise ValueError(f"--resume: max_steps={cfg.max_steps} is below the step of {latest} "
                             f"({state['step']}); give max_steps ≥ {state['step']}")
        return fingerprint
    if cfg.overwrite or not out.exists():
        return fingerprint
    if found:
        raise ValueError(f"{out}: already holds checkpoints (newest {found[-1].name}); pass --resume to continue "
                         "that run, --overwrite to replace it, or choose another --output-dir")
    model_files = [name for name in MODEL_FILES if (out / name).exists()]
    if (out / FINISHED).exists() or model_files:
        what = "a finished run" if (out / FINISHED).exists() else f"a model ({model_files[0]})"
        raise ValueError(f"{out}: already holds {what}; pass --overwrite to replace it or choose another --output-dir")
    if (out / "config.yaml").is_file():
        saved = yaml.safe_load((out / "config.yaml").read_text())
        saved.setdefault("sharding", "none")  # written before the field existed
        saved_fingerprint = (json.loads((out / FINGERPRINT).read_text()) if (out / FINGERPRINT).is_file()
                             else None)
        differences = config_differences(saved, current, saved_fingerprint, fingerprint)
        # A start that logged no step (it failed or was killed before its first one: a reward
        # function's error, say) holds nothing to keep; it must not block the corrected run.
        if differences and steps_logged(out) > 0:
            raise ValueError(f"{out}: holds the start of another run (it differs in {', '.join(differences)}); "
                             "pass --overwrite to replace it or choose another --output-dir")
    return fingerprint


BATCH_SPLIT = ("batch_size", "grad_accum")
"""Keys a resumed sharded run may change along with the process count, as long as the global batch
(what each step trains on, common.step_items) stays the same."""


def global_batch_error(latest: Path, state: dict, cfg: TrainConfig, world: int) -> str:
    """The one-line refusal of a resumed sharded run whose global batch differs from its checkpoint's."""
    saved = state["global_batch"]
    fix = (f"give batch_size × grad_accum = {saved // world} on {world} process(es)" if saved % world == 0
           else f"{saved} does not divide over {world} processes; use a process count that divides it")
    return (f"--resume: {latest} trained on global batches of {saved} records ({state['world_size']} process(es)); "
            f"this run's would be {cfg.global_batch(world)} ({world} process(es) × batch_size {cfg.batch_size} × "
            f"grad_accum {cfg.grad_accum}): {fix}")


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote to `out`: checkpoints, RUN_FILES and its final model (the
    files FINISHED lists, else MODEL_FILES). Other files (a recipe's stage.yaml and log.txt) stay."""
    listed = json.loads((out / FINISHED).read_text())["files"] if (out / FINISHED).is_file() else MODEL_FILES
    for name in (*listed, *RUN_FILES, "checkpoints", FINAL_TMP):
        path = out / Path(name).name   # a name only: never outside the run folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def steps_logged(out: Path) -> int:
    """The highest "step" in the run folder's metrics.jsonl and samples.jsonl (0: none, or only
    the evaluation before the first step); lines that are not JSON objects are passed over."""
    highest = 0
    for path in (out / "metrics.jsonl", out / "samples.jsonl"):
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                highest = max(highest, row["step"])
    return highest


def trim_rows(path: Path, step: int) -> int:
    """Keep the JSON lines of `path` whose "step" is ≤ `step` (those logged before the checkpoint
    a run resumes from; a line cut short by a kill goes too). Returns how many were removed."""
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            removed += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            removed += 1
    if removed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return removed


def prepare_output_dir(accelerator: Accelerator, cfg: TrainConfig, fingerprint: dict[str, str]) -> None:
    """The first write to the run folder, once data, judges and models have loaded and
    check_output_dir has passed: a fresh run clears what an earlier one left (a partial run of the
    same config, or anything with --overwrite); a resumed one drops metric and sample rows logged
    after its checkpoint. Then the config and the data fingerprint are saved."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            step = json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())["step"]
            shutil.rmtree(out / FINAL_TMP, ignore_errors=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                if removed := trim_rows(out / name, step):
                    accelerator.print(f"{out / name}: removed {removed} rows logged after step {step}")
        else:
            clear_run(out)
        (out / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1))
        (out / "config.yaml").write_text(to_yaml(run_config(cfg)))
    accelerator.wait_for_everyone()
    accelerator.print("resolved config:\n" + to_yaml(cfg).rstrip())


def save_final_model(out: Path, save, step: int) -> None:
    """`save(folder)` into out/FINAL_TMP, then its files renamed into `out` (a rename needs no
    space, so a full disk fails before any file of the old model is touched) and FINISHED
    written last: a folder without FINISHED never passes for a finished run."""
    tmp = out / FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    # An earlier final model's files that this one lacks (an adapter beside merged weights)
    # would make a folder that loads as neither.
    earlier = json.loads((out / FINISHED).read_text())["files"] if (out / FINISHED).is_file() else []
    (out / FINISHED).unlink(missing_ok=True)
    for name in (*set(earlier) - set(names), *names):
        target = out / Path(name).name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for name in names:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    (tmp.with_name(FINISHED + ".tmp")).write_text(json.dumps({"step": step, "files": names}, indent=1))
    os.replace(tmp.with_name(FINISHED + ".tmp"), out / FINISHED)


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


# ---------------------------------------------------------------- signals


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, and keeps the last
    completed step for an error.

    On a signal the loop writes a checkpoint and exits with 128+signal, so a preempted job never
    loses more than the step in flight and a shell pipeline does not treat it as success. On an
    exception inside `installed()` (a reward function that raises at iteration 500, a record the
    collator cannot take), the state of the last step passed to `step_done` is saved as a checkpoint
    before the error goes on, so --resume continues from it once the cause is fixed; when
    save_steps already wrote it, it is named instead. Not when the optimizer has stepped since
    (an error between PPO's or GRPO's minibatch updates): the weights are then of no step. Nor on
    several processes: one process's error leaves the others inside a collective, where saving
    would hang.
    """

    def __init__(self, accelerator: Accelerator | None = None, cfg: TrainConfig | None = None, command: str = "",
                 optimizer=None):
        self.signum: int | None = None
        self.accelerator, self.cfg, self.command, self.optimizer = accelerator, cfg, command, optimizer
        self.done: tuple[int, float | None, dict | None] | None = None

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def step_done(self, step: int, extra: dict | None = None) -> None:
        """Step `step` (1-based) has made its last update of the weights (`extra`: the trainer's
        own state a checkpoint of it keeps, as save_checkpoint takes it)."""
        self.done = (step, self._updates(), extra)
        # The random states as the step left them: a checkpoint written after a failure must
        # hold these, not what the failed step's draws (dropout) advanced them to.
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def _updates(self) -> float | None:
        """The optimizer's update count (AdamW's `step` of its first parameter): every parameter
        it steps advances together, skipped non-finite updates (NonFiniteGuard) not at all."""
        state = next(iter(self.optimizer.state.values()), {}) if self.optimizer is not None else {}
        return float(state["step"]) if "step" in state else None

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        except Exception:
            self._keep_after_failure()
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _keep_after_failure(self) -> None:
        if self.accelerator is None or self.done is None or self.accelerator.num_processes > 1:
            return
        step, updates, extra = self.done
        out = Path(self.cfg.output_dir)
        if self._updates() != updates:
            tqdm.write(f"the run failed while updating the weights after step {step}: no checkpoint of it is "
                       "written", file=sys.stderr)
            return
        final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
        if not final.is_dir():
            random.setstate(self.rng[0])
            np.random.set_state(self.rng[1])
            torch.set_rng_state(self.rng[2])
            try:
                save_checkpoint(self.accelerator, self.cfg, step, extra)
            except Exception as err:  # the error that stopped the run is the one to report
                tqdm.write(f"the run failed after step {step}, and its checkpoint could not be written "
                           f"({type(err).__name__}: {err})", file=sys.stderr)
                return
        tqdm.write(f"the run failed after step {step}; its state is in {final}. Once the cause is fixed, "
                   f"resume with: posttrain {self.command} --config {out / 'config.yaml'} --resume", file=sys.stderr)


def stop_message(cfg: TrainConfig, step: int, command: str) -> str:
    return (f"stopped by signal at step {step}; checkpoint saved in {cfg.output_dir}/checkpoints. "
            f"Resume with: posttrain {command} --config {cfg.output_dir}/config.yaml --resume")


def keep_until_exit(accelerator: Accelerator) -> None:
    """Keep a multi-process run's accelerator alive until exit (sharding.KEPT_UNTIL_EXIT, which
    holds its DDP module since `sharding.prepare`)."""
    if accelerator.num_processes > 1:
        sharding.KEPT_UNTIL_EXIT.append(accelerator)


def checkpoint_and_exit(accelerator: Accelerator, cfg: TrainConfig, log: "RunLog", step: int,
                        command: str, signum: int, extra: dict | None = None) -> NoReturn:
    """The end of a run stopped by SIGINT/SIGTERM: checkpoint, say how to resume, exit 128+signal."""
    save_checkpoint(accelerator, cfg, step, extra)
    log.close()
    accelerator.end_training()
    keep_until_exit(accelerator)
    accelerator.print(stop_message(cfg, step, command))
    sys.exit(128 + signum)


def finish_run(accelerator: Accelerator, cfg: TrainConfig, log: "RunLog", save, what: str, *, step: int,
               command: str, extra: dict | None = None) -> Path:
    """The end of a completed run: the main process writes the model with `save(folder)` through
    save_final_model, all wait, and accelerate is shut down last (it ends the trackers and tears
    down the process group, so no collective may follow). Returns the output folder.

    If the final save fails (a full disk, say), the trained state of `step` (with the trainer's
    `extra` state) is kept as a checkpoint and the error names it and the command that finishes
    the run; `command` is the CLI command (sft, dpo, …)."""
    log.close()
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            save_final_model(out, save, step)
        except Exception as err:  # whatever stopped the save, the trained weights must survive it
            failure = err
            shutil.rmtree(out / FINAL_TMP, ignore_errors=True)   # frees the space the partial model took
    if global_sum(accelerator, failure is not None):
        raise final_save_error(accelerator, cfg, what, step, command, extra, failure) from failure
    accelerator.print(f"saved the {what} to {out}")
    # A barrier right before the teardown, as before the failure check existed: without it a
    # two-process run intermittently deadlocked in the process group's teardown (both ranks
    # stuck in native code after train() returned), 1 run in 3 here.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    keep_until_exit(accelerator)
    return out


def final_save_error(accelerator: Accelerator, cfg: TrainConfig, what: str, step: int, command: str,
                     extra: dict | None, failure: Exception | None) -> ValueError:
    """Checkpoint the trained state after a failed final save; the one-line error that says where."""
    cause = (" ".join(str(failure).split()) or type(failure).__name__) if failure else "on the main process"
    out = Path(cfg.output_dir)
    try:
        kept = save_checkpoint(accelerator, cfg, step, extra)
    except Exception as err:
        shutil.rmtree(out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}.tmp", ignore_errors=True)
        found = checkpoints(out)
        return ValueError(f"{out}: saving the final {what} failed ({cause}) and so did a checkpoint of step {step} "
                          f"({' '.join(str(err).split())}); the newest complete checkpoint is "
                          f"{found[-1] if found else 'none'}")
    return ValueError(f"{out}: saving the final {what} failed ({cause}); the trained state of step {step} is kept "
                      f"in {kept}. Finish with: posttrain {command} --config {out / 'config.yaml'} --resume")


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
