"""`posttrain run RECIPE.yaml`: the notes' whole pipeline as stages, each cached by a hash.

A recipe is YAML:

    output_dir: outputs/quickstart      # every stage gets a folder under it
    defaults: {precision: auto}         # given to every stage whose kind has the key
    stages:
      - {name: sft, kind: sft, model: smollm2-135m-instruct, data: examples/data/instructions.jsonl}
      - {name: samples, kind: sample, model: "${sft}", data: examples/data/prompts.jsonl, n: 4}
      - {name: prefs, kind: judge, data: "${samples}", judge: "fn:examples.rewards:brevity"}
      - {name: dpo, kind: dpo, model: "${sft}", data: "${prefs}"}

A stage's keys are those of its command's config (trainers) or function (the other kinds,
STAGE_KINDS below); `${name}` anywhere in a value is the output of the earlier stage `name` —
a trainer's model folder, a data stage's file. Stages run in dependency order (recipe order
among independent ones).

Caching: a stage's folder is `OUTPUT_DIR/NAME-HASH`, HASH covering its kind, its resolved
keys, the hashes of the stages it refers to and the contents of the files it names. A folder
holding `DONE` is reused; one without it is an interrupted stage: a trainer resumes from its
newest checkpoint, `sample` and `generate` continue their files, the other kinds (seconds long)
start again. `OUTPUT_DIR/NAME` is a link to the stage's current folder. `--from STAGE` runs
that stage and everything downstream again; `--dry-run` prints the plan.

Every check on the recipe — unknown kind, unknown or missing key, a bad trainer value, a
reference to no stage, a cycle — runs before any stage does. Each stage's own printing
(resolved config, summaries) goes to its `log.txt`; the console gets one line per stage and
the progress bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import graphlib
import hashlib
import inspect
import json
import logging
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
import types
import typing
from typing import Any, Callable

import yaml

from posttrain.config import BOOL_WORDS, CONFIGS, YAML12_FLOAT, YAML12_INT, ConfigError, UniqueKeyLoader, coerce
from posttrain.data.errors import invisible_character, is_blank

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
FUNCTION_SPEC = re.compile(r"\bfn:([A-Za-z0-9_.]+:[A-Za-z0-9_]+)")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
TRAINER_MODULES = {"sft": "posttrain.trainers.sft", "rm": "posttrain.trainers.reward",
                   "dpo": "posttrain.trainers.dpo", "kto": "posttrain.trainers.kto",
                   "ppo": "posttrain.trainers.ppo", "grpo": "posttrain.trainers.grpo",
                   "rloo": "posttrain.trainers.grpo"}
"""Trainer kinds → the module whose `train(cfg)` runs them (their keys: CONFIGS[kind]'s fields)."""
RECIPE_OWNED = ("output_dir", "resume", "overwrite")
"""Trainer keys the recipe sets itself: the stage folder, and whether to resume into it or replace it."""


@dataclass(frozen=True)
class FunctionStage:
    """A stage kind run by one function: its keyword arguments are the stage's keys."""

    target: str
    """"module:function"; the function takes the keys and `output_param`."""
    output_param: str
    """The argument that receives where to write."""
    output_name: str = ""
    """File name inside the stage folder given to output_param ("" : the folder itself)."""
    resumable: bool = False
    """The function continues a partial output itself and returns the number of the signal that
    stopped it, None when it finished (otherwise an interrupted stage restarts)."""
    check: str = ""
    """"module:function" taking the same keys (references replaced by the paths their stages will
    write), called for every such stage before any stage runs; ValueError for a bad key."""

    def function(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(import_module(module), name)


STAGE_KINDS: dict[str, FunctionStage] = {
    "python": FunctionStage("posttrain.recipe_stages:python_stage", "output", "data.jsonl"),
    "concat": FunctionStage("posttrain.recipe_stages:concat_files", "output", "data.jsonl"),
    "sample": FunctionStage("posttrain.recipe_stages:sample_stage", "output", "samples.jsonl", resumable=True,
                            check="posttrain.recipe_stages:check_sample_stage"),
    "judge": FunctionStage("posttrain.scoring.files:judge_file", "output", "judged.jsonl"),
    "best_of_n": FunctionStage("posttrain.datagen.best_of_n:best_of_n_file", "output", "sft.jsonl"),
    "template": FunctionStage("posttrain.datagen.templates:template_file", "output", "instructions.jsonl"),
    "mix": FunctionStage("posttrain.datagen.mix:mix_files", "output", "mix.jsonl"),
    "eval": FunctionStage("posttrain.recipe_stages:eval_stage", "output_dir",
                          check="posttrain.recipe_stages:check_eval_stage"),
    "report": FunctionStage("posttrain.eval.report:write_report", "output", "report.html"),
}
"""The kinds that are not trainers; `recipe_kinds()` lists every kind."""


def recipe_kinds() -> list[str]:
    return [*TRAINER_MODULES, *STAGE_KINDS]


class RecipeError(ValueError):
    """A recipe no run could follow; the message names the file, the stage and the key."""


@dataclass
class Stage:
    """One stage of a recipe, resolved: its keys with references, where it runs, its state."""

    index: int
    name: str
    kind: str
    keys: dict[str, Any]
    """The stage's keys after `defaults`, references still as `${name}`."""
    needs: list[str]
    """Names of the stages it refers to."""
    hash: str = ""
    folder: Path | None = None
    output: Path | None = None

    @property
    def done(self) -> bool:
        return (self.folder / "DONE").is_file()


# ---------------------------------------------------------------- reading and checking


def load_recipe(source: str | Path | dict) -> tuple[str, dict]:
    """(what to call it in errors, the parsed mapping) from a YAML path or a mapping."""
    if isinstance(source, dict):
        return "recipe", source
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping with 'stages', got {type(raw).__name__}")
    return str(path), raw


def parse_stages(where: str, raw: dict) -> tuple[Path, list[Stage]]:
    """The recipe's output folder and stages, every check of the module docstring done."""
    unknown = set(raw) - {"output_dir", "defaults", "stages"}
    if unknown:
        raise RecipeError(f"{where}: unknown top-level key {sorted(unknown)[0]!r} "
                          "(expected output_dir, defaults, stages)")
    output_dir, defaults, entries = raw.get("output_dir"), raw.get("defaults") or {}, raw.get("stages")
    if not isinstance(output_dir, str) or not output_dir:
        raise RecipeError(f"{where}: 'output_dir' must name a folder, got {output_dir!r}")
    if hidden := invisible_character(output_dir):
        raise RecipeError(f"{where}: output_dir={output_dir!r} holds a hidden character, {hidden}; type the name again")
    if not isinstance(defaults, dict):
        raise RecipeError(f"{where}: 'defaults' must be a mapping of keys, got {defaults!r}")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: 'stages' must be a non-empty list of stages")
    stages: dict[str, Stage] = {}
    for index, entry in enumerate(entries):
        stage = parse_stage(where, index, entry, defaults)
        if stage.name in stages:
            raise RecipeError(f"{where}: stage {index + 1}: name {stage.name!r} is used twice")
        stages[stage.name] = stage
    used = {key for stage in stages.values() for key in stage_keys(stage.kind)}
    for key in defaults:
        if key.replace("-", "_") not in used:
            close = difflib.get_close_matches(key, sorted(used), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: 'defaults' key {key!r} is a key of no stage's kind in this recipe{hint}")
    for stage in stages.values():
        for ref in stage.needs:
            if ref not in stages:
                close = difflib.get_close_matches(ref, stages, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(f"{where}: stage {stage.name!r} refers to ${{{ref}}}, which is no stage{hint}")
    return Path(output_dir), ordered(where, stages)


def parse_stage(where: str, index: int, entry: Any, defaults: dict) -> Stage:
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: stage {index + 1}: expected a mapping with name and kind, got {entry!r}")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RecipeError(f"{where}: stage {index + 1}: 'name' must be letters, digits, '_', '-' or '.', got {name!r}")
    if kind not in recipe_kinds():
        raise RecipeError(f"{where}: stage {name!r}: unknown kind {kind!r}; known kinds: {', '.join(recipe_kinds())}")
    allowed = stage_keys(kind)
    keys = {k.replace("-", "_"): v for k, v in entry.items() if k not in ("name", "kind")}
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: stage {name!r}: unknown key {key!r} for kind {kind}{hint}")
    keys = {**{k: v for k, v in defaults.items() if k in allowed}, **keys}
    missing = [k for k in required_keys(kind) if k not in keys]
    if missing:
        raise RecipeError(f"{where}: stage {name!r}: kind {kind} needs the key {missing[0]!r}")
    return Stage(index, name, kind, keys, sorted(set(REFERENCE.findall(json.dumps(keys)))))


def stage_keys(kind: str) -> list[str]:
    """The keys a stage of this kind accepts."""
    if kind in TRAINER_MODULES:
        return [f.name for f in dataclasses.fields(CONFIGS[kind]) if f.name not in RECIPE_OWNED]
    spec = STAGE_KINDS[kind]
    return [p for p in inspect.signature(spec.function()).parameters if p != spec.output_param]


def required_keys(kind: str) -> list[str]:
    if kind in TRAINER_MODULES:
        return ["model", "data"] if kind != "ppo" else ["model", "data", "reward_model"]
    spec = STAGE_KINDS[kind]
    return [p.name for p in inspect.signature(spec.function()).parameters.values()
            if p.default is inspect.Parameter.empty and p.name != spec.output_param
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def ordered(where: str, stages: dict[str, Stage]) -> list[Stage]:
    """Dependency order, recipe order among stages that are ready together; a cycle is an error."""
    sorter = graphlib.TopologicalSorter({s.name: s.needs for s in stages.values()})
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        raise RecipeError(f"{where}: stages refer to each other in a cycle: {' → '.join(err.args[1])}") from None
    order = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: stages[n].index)
        order += [stages[n] for n in ready]
        sorter.done(*ready)
    return order


# ---------------------------------------------------------------- hashes and folders


def file_digest(value: str) -> str | None:
    """What a literal value names, for the hash: a file's contents, a folder's listing (names,
    sizes and modification times — model folders are too big to read on every run), or None."""
    path = Path(value)
    with contextlib.suppress(OSError, ValueError):
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_dir():
            listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in path.rglob("*") if p.is_file())
            return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None


def module_digest(function: str) -> str | None:
    """The source file of a python stage's "module:function", for its hash (None if not found)."""
    import importlib.util

    from posttrain.scoring.function import current_folder_first

    with current_folder_first(), contextlib.suppress(ImportError, ValueError, AttributeError):
        spec = importlib.util.find_spec(function.partition(":")[0])
        return file_digest(spec.origin) if spec and spec.origin else None
    return None


def literal_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if not REFERENCE.search(value) else []
    if isinstance(value, list):
        return [s for v in value for s in literal_strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in literal_strings(v)]
    return []


def plan(output_dir: Path, stages: list[Stage]) -> None:
    """Give every stage its hash, folder and output path (stages in dependency order)."""
    by_name = {s.name: s for s in stages}
    for stage in stages:
        files = {s: file_digest(s) for s in literal_strings(stage.keys)}
        if stage.kind == "python":
            files["source"] = module_digest(str(stage.keys.get("function", "")))
        for spec in FUNCTION_SPEC.findall(json.dumps(stage.keys)):   # fn: judges' code counts too
            files[f"fn:{spec}"] = module_digest(spec)
        identity = {"kind": stage.kind, "keys": typed_keys(stage), "files": {k: v for k, v in files.items() if v},
                    "needs": {n: by_name[n].hash for n in stage.needs}}
        stage.hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
        stage.folder = output_dir / f"{stage.name}-{stage.hash}"
        name = "" if stage.kind in TRAINER_MODULES else STAGE_KINDS[stage.kind].output_name
        stage.output = stage.folder / name if name else stage.folder


def typed_keys(stage: Stage) -> dict:
    """The stage's keys as the stage will read them (`coerce` for a trainer, `conform` for a function
    stage), for its hash: `temperature: "0.7"` and `temperature: 0.7` are the same stage. A value
    that does not convert is kept as written; run_recipe refuses it before any stage runs."""
    trainer = stage.kind in TRAINER_MODULES
    hints = {} if trainer else typing.get_type_hints(STAGE_KINDS[stage.kind].function())
    typed = {}
    for key, value in stage.keys.items():
        try:
            typed[key] = coerce(CONFIGS[stage.kind], key, value, "") if trainer else conform(value, hints.get(key, Any))
        except (ConfigError, TypeError):
            typed[key] = value
    return typed


def substitute(value: Any, outputs: dict[str, Path]) -> Any:
    """`value` with every `${name}` replaced by that stage's output path."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return str(outputs[whole.group(1)])
        return REFERENCE.sub(lambda m: str(outputs[m.group(1)]), value)
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    return value


def trainer_config(where: str, stage: Stage, values: dict, *, resume: bool):
    cls = CONFIGS[stage.kind]
    try:
        checked = {k: coerce(cls, k, v, f"{where}: stage {stage.name!r}") for k, v in values.items()}
        # A stage folder without DONE or checkpoints holds only a partial run of this stage: replace it.
        cfg = cls(**checked, output_dir=str(stage.folder), resume=resume, overwrite=not resume)
        cfg.validate()
    except ConfigError as err:
        message = str(err)
        raise RecipeError(message if message.startswith(where) else f"{where}: stage {stage.name!r}: {message}") from None
    return cfg


def conform(value: Any, hint: Any) -> Any:
    """`value` read from YAML as the type `hint` of a stage function's parameter says, converted
    as a trainer's config converts it (config.coerce): a bool takes BOOL_WORDS ("false" is
    false), a float an int or a YAML 1.2 number string, an int a whole-number string, X | None a
    None. TypeError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return conform(value, option)
            except TypeError:
                pass
        raise TypeError
    if hint is type(None) and value is None:
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[str(value).strip().lower()]
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and YAML12_INT.fullmatch(value.strip()):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif list in (hint, origin):
        if isinstance(value, list):
            return [conform(v, args[0]) for v in value] if args else value
    elif dict in (hint, origin):
        if isinstance(value, dict):
            return value
    elif hint is Any:
        return value
    raise TypeError


PATH_KEYS = ("files", "model", "models", "data", "judge", "rubric", "source", "templates", "specs", "baseline",
             "baselines", "run_dirs", "evals", "function")
"""Function stages' keys that name files, folders, models or functions (config.PATH_FIELDS for trainers)."""


def function_stage_values(where: str, stage: Stage, values: dict) -> dict:
    """A function stage's keys checked against its function's annotations and converted
    (`conform`); RecipeError naming the stage, the key and its value for one that does not fit."""
    hints = typing.get_type_hints(STAGE_KINDS[stage.kind].function())
    out = {}
    for key, value in values.items():
        texts = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        blank = next((t for t in texts if isinstance(t, str) and t and is_blank(t)), None)
        if blank is not None and key != "stop_strings":   # a newline is a stop string worth stopping at
            raise RecipeError(f"{where}: stage {stage.name!r} ({stage.kind}): {key}={value!r} holds a blank text "
                              f"{blank!r} (only spaces or invisible characters)")
        # Only keys that name files, models or functions: a template's text may hold a newline.
        hidden = key in PATH_KEYS and next(filter(None, (invisible_character(t) for t in texts if isinstance(t, str))),
                                           None)
        if hidden:
            raise RecipeError(f"{where}: stage {stage.name!r} ({stage.kind}): {key}={value!r} holds a hidden "
                              f"character, {hidden}; type the name again")
        hint = hints.get(key, Any)
        try:
            out[key] = conform(value, hint)
        except TypeError:
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise RecipeError(f"{where}: stage {stage.name!r} ({stage.kind}): {key}={value!r} should be of type "
                              f"{kind}") from None
    return out


# ---------------------------------------------------------------- running


def run_recipe(source: str | Path | dict, *, from_stage: str | None = None, dry_run: bool = False,
               echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run (or, with dry_run, plan) a recipe; returns each stage's output path by name.

    source: a YAML path or the same mapping. from_stage: that stage and every stage downstream
    of it run again even if cached. Raises RecipeError (a ValueError) for a bad recipe before
    any stage runs; a stage's own errors propagate with the stage named in the console line.
    """
    where, raw = load_recipe(source)
    output_dir, stages = parse_stages(where, raw)
    plan(output_dir, stages)
    outputs = {s.name: s.output for s in stages}
    for stage in stages:   # values are checked now, not when their turn comes
        values = substitute(stage.keys, outputs)
        if stage.kind in TRAINER_MODULES:
            trainer_config(where, stage, values, resume=False)
            continue
        values = function_stage_values(where, stage, values)
        if STAGE_KINDS[stage.kind].check:
            check = import_module(STAGE_KINDS[stage.kind].check.partition(":")[0])
            try:
                getattr(check, STAGE_KINDS[stage.kind].check.partition(":")[2])(**values)
            except ValueError as err:
                raise RecipeError(f"{where}: stage {stage.name!r} ({stage.kind}): {err}") from None
    check_eval_references(where, stages)
    forced = downstream(stages, from_stage, where)
    began = time.perf_counter()
    width = max(len(s.name) for s in stages)
    for number, stage in enumerate(stages, start=1):
        head = f"[{number:>{len(str(len(stages)))}}/{len(stages)}] {stage.name:<{width}} {stage.kind:<9}"
        resumable = stage.kind in TRAINER_MODULES or STAGE_KINDS[stage.kind].resumable
        state = ("forced" if stage.name in forced else "cached" if stage.done
                 else "resume" if stage.folder.exists() and resumable else "run")
        if dry_run:
            echo(f"{head} {state:<6} {stage.folder}")
            continue
        if state == "cached":
            echo(f"{head} cached  {stage.output}")
            link(output_dir, stage)
            continue
        if state == "forced":
            shutil.rmtree(stage.folder, ignore_errors=True)
        start = time.perf_counter()
        values = substitute(stage.keys, outputs)
        if stage.kind == "eval" and judge_took_part(values.get("judge", ""), stage, stages, outputs):
            values["judge_used_in_training"] = True
        try:
            run_stage(where, stage, values)
        except SystemExit as stop:   # a trainer or sampler stopped by SIGINT/SIGTERM, its state saved
            if stop.code not in (0, None):
                print(f"stage {stage.name!r} stopped (exit {stop.code}); run the recipe again to resume it",
                      file=sys.stderr)
            raise
        except (ValueError, OSError) as err:
            if not resumable:   # nothing of a non-resumable stage is worth keeping
                shutil.rmtree(stage.folder, ignore_errors=True)
            raise RecipeError(f"stage {stage.name!r} ({stage.kind}): {err}") from err
        (stage.folder / "DONE").write_text(f"{time.perf_counter() - start:.1f} s\n")
        link(output_dir, stage)
        echo(f"{head} {'resumed' if state == 'resume' else 'ran'} in {time.perf_counter() - start:.0f} s → {stage.output}")
    if not dry_run:
        reports = [str(output_dir / s.name / STAGE_KINDS[s.kind].output_name) for s in stages if s.kind == "report"]
        echo(f"finished in {time.perf_counter() - began:.0f} s; every stage's folder (config, log.txt) is under "
             f"{output_dir}")
        for path in reports:
            echo(f"report: {path}")
    return outputs


def check_eval_references(where: str, stages: list[Stage]) -> None:
    """A reference into an eval stage's folder (`${eval}/eval.json`, `${eval}/LABEL/eval.json`)
    must name a file that stage writes: one baseline writes eval.json and eval.md in its folder,
    several write them in a folder per baseline label."""
    writes = {}
    for stage in stages:
        if stage.kind == "eval":
            labels = stage.keys.get("baselines")
            prefixes = [f"{label}/" for label in labels] if isinstance(labels, dict) else [""]
            writes[stage.name] = [f"{prefix}{name}" for prefix in prefixes for name in ("eval.json", "eval.md")]
    for stage in stages:
        for name, rest in re.findall(r"\$\{([A-Za-z0-9_.-]+)\}/([^\s,'\"\\]+)", json.dumps(stage.keys)):
            if name in writes and rest not in writes[name]:
                raise RecipeError(f"{where}: stage {stage.name!r} refers to ${{{name}}}/{rest}, which stage "
                                  f"{name!r} does not write; it writes {', '.join(writes[name])}")


def downstream(stages: list[Stage], from_stage: str | None, where: str) -> set[str]:
    if from_stage is None:
        return set()
    names = [s.name for s in stages]
    if from_stage not in names:
        raise RecipeError(f"{where}: --from {from_stage!r} is no stage; stages: {', '.join(names)}")
    forced = {from_stage}
    for stage in stages:   # dependency order: a stage's inputs are decided before it
        if forced & set(stage.needs):
            forced.add(stage.name)
    return forced


def judge_took_part(spec: str, stage: Stage, stages: list[Stage], outputs: dict[str, Path]) -> bool:
    """Whether the eval judge `spec` built the data or rewards of any stage upstream of `stage`:
    a `judge` stage with that spec, or a PPO reward model / GRPO-RLOO judge that is the same
    model or function. The report then says so, whatever the recipe claimed."""
    by_name = {s.name: s for s in stages}
    upstream, todo = set(), list(stage.needs)
    while todo:
        name = todo.pop()
        if name not in upstream:
            upstream.add(name)
            todo += by_name[name].needs
    used = set()
    for name in upstream:
        values = substitute(by_name[name].keys, outputs)
        if by_name[name].kind in ("judge", "best_of_n") and "judge" in values:
            used.add(str(values["judge"]).strip())
        if values.get("reward_model"):
            used.add(f"rm:{values['reward_model']}")
        used.update(part.strip() for part in str(values.get("judges", "")).split(",") if part.strip())
    return str(spec).strip() in used


def run_stage(where: str, stage: Stage, values: dict) -> None:
    """Run one stage in its folder with its printing and warnings sent to its log.txt."""
    resumable = stage.kind in TRAINER_MODULES or STAGE_KINDS[stage.kind].resumable
    if stage.folder.exists() and not resumable:
        shutil.rmtree(stage.folder)
    stage.folder.mkdir(parents=True, exist_ok=True)
    (stage.folder / "stage.yaml").write_text(yaml.safe_dump(
        {"name": stage.name, "kind": stage.kind, **values}, sort_keys=False))
    with (stage.folder / "log.txt").open("a") as log, quiet_libraries(log):
        if stage.kind in TRAINER_MODULES:
            # A complete checkpoint, not the `.tmp` of a write cut short (trainers.run_folder.checkpoints).
            resume = (stage.folder / "checkpoints").is_dir() and any(
                not p.name.endswith(".tmp") for p in (stage.folder / "checkpoints").iterdir())
            cfg = trainer_config(where, stage, values, resume=resume)
            import_module(TRAINER_MODULES[stage.kind]).train(cfg)
            return
        spec = STAGE_KINDS[stage.kind]
        values = function_stage_values(where, stage, values)
        stopped_by = spec.function()(**values, **{spec.output_param: str(stage.output)})
    if spec.resumable and stopped_by is not None:   # SIGINT/SIGTERM: its file is whole, a re-run continues
        print(f"stage {stage.name!r} stopped by signal {stopped_by}; run the recipe again to continue it",
              file=sys.stderr)
        sys.exit(128 + stopped_by)


@contextlib.contextmanager
def quiet_libraries(log):
    """Stage output to `log`: stdout, Python warnings and library logging. Progress bars (stderr)
    stay on the console; transformers' and datasets' own load bars are turned off."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    handler = logging.StreamHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    quieted = {name: logging.getLogger(name).propagate for name in ("transformers", "datasets", "accelerate")}
    for name in quieted:
        logging.getLogger(name).addHandler(handler)
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        try:
            yield
        finally:
            root.removeHandler(handler)
            for name in quieted:
                logging.getLogger(name).removeHandler(handler)


def link(output_dir: Path, stage: Stage) -> None:
    """Point OUTPUT_DIR/NAME at the stage's current folder (replaced atomically)."""
    target, temporary = output_dir / stage.name, output_dir / f".{stage.name}.link"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(stage.folder.name)
    temporary.replace(target)
