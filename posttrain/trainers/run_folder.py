"""The run folder: what a fresh or resumed run may write into, its config and data
fingerprint, checkpoints (save and resume) and the final model's atomic save."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml
from accelerate import Accelerator

from posttrain.config import TrainConfig, to_yaml
from posttrain.trainers import sharding

CHECKPOINT_PREFIX = "checkpoint-"


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
SAVED_BESIDE = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "README.md")
"""Files a final save may write beside the model (its tokenizer, generation settings, peft's model card)."""
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
    if not (out / "config.yaml").exists():
        # No posttrain run wrote here (a run writes config.yaml first): nothing of what is here is a
        # run's to replace, and clear_run would delete a user's own checkpoints/ or samples.jsonl.
        taken = sorted(name for name in (*RUN_FILES, "checkpoints", FINAL_TMP, *SAVED_BESIDE) if (out / name).exists())
        if taken:
            raise ValueError(f"{out}: holds {', '.join(taken)}, which no posttrain run wrote and this run would "
                             "replace; pass --overwrite to replace them or choose another --output-dir")
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


RECIPE_FILES = ("stage.yaml", "log.txt")
"""What a recipe writes into a trainer stage's folder before the trainer starts."""


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that are not a posttrain run's (sorted); none for a folder that already holds a
    run's config.yaml (a run's own files, tokenizer and tracker logs included, are then expected)."""
    if not out.is_dir() or (out / "config.yaml").exists():
        return []
    own = {*RUN_FILES, *MODEL_FILES, *SAVED_BESIDE, *RECIPE_FILES, "checkpoints", FINAL_TMP}
    return sorted(entry.name for entry in out.iterdir() if entry.name not in own)


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
            if others := foreign_entries(out):
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                accelerator.print(f"note: {out} already holds {len(others)} file(s) or folder(s) no posttrain run "
                                  f"wrote ({shown}); this run's files go beside them")
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
