"""The stage kinds of recipes that are not a trainer or an existing command function: small
adapters with flat keyword arguments (a recipe's keys) around the commands' functions.

Each takes its keys and the path to write (`output` / `output_dir`); posttrain.recipes lists them
in STAGE_KINDS. `sample_stage` returns the signal that stopped it (None when done), as
`posttrain sample` does, so an interrupted recipe continues the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

def concat_files(files: list[str], output: str) -> int:
    """Concatenate JSONL files (e.g. human-written and judged preferences) into `output`;
    returns the line count. FileNotFoundError / ValueError name the file and line."""
    from posttrain.scoring.files import write_jsonl_atomic

    if not isinstance(files, list) or not files:
        raise ValueError(f"concat: 'files' must be a non-empty list of JSONL files, got {files!r}")
    records = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number}: not JSON ({err.msg})") from None
    write_jsonl_atomic(output, records)
    print(f"concatenated {len(records)} records from {len(files)} files into {output}")
    return len(records)


def python_stage(function: str, output: str, args: dict | None = None) -> Any:
    """Your own data step: `function` ("module:function", looked up from the current folder
    first, as fn: judges are) is called as function(output=PATH, **args) and writes PATH. The
    stage's hash covers the module's source file, so editing the function re-runs the stage."""
    from posttrain.scoring.function import load_reward_fn

    if args is not None and not isinstance(args, dict):
        raise ValueError(f"python: 'args' must be a mapping of keyword arguments, got {args!r}")
    fn = load_reward_fn(function)   # the same "module:function" lookup as fn: specs
    try:
        result = fn(output=output, **(args or {}))
    except Exception as err:  # any failure of user code becomes one line naming it
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{function} raised {type(err).__name__}{': ' + first if first else ''}") from err
    if not Path(output).exists():
        raise ValueError(f"python: {function} returned without writing {output}")
    return result


def eval_stage(models: dict, data: str, judge: str, output_dir: str, *, baseline: str | None = None,
               baseline_label: str = "baseline", baselines: dict | None = None, n_samples: int = 1,
               max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               judge_used_in_training: bool = False, kl_samples: int = 1, batch_size: int = 8,
               precision: str = "auto", confidence: float = 0.95) -> None:
    """`posttrain eval` with flat sampling keys. Against one `baseline`: eval.json and eval.md in
    the stage folder; against several (`baselines`: {label: model}, every model's answers
    sampled once): in a folder per baseline label, `${stage}/LABEL/eval.json`. The tables go to
    the stage's log. run_recipe sets judge_used_in_training itself when an upstream stage used
    the same judge."""
    from posttrain.eval.run import evaluate, evaluate_many

    args = _eval_args(models, baseline, baseline_label, baselines, n_samples, max_new_tokens, temperature, top_p,
                      top_k, seed, kl_samples, confidence)
    options = dict(output_dir=output_dir, n_samples=n_samples, params=args["params"],
                   judge_used_in_training=judge_used_in_training, kl_samples=kl_samples, batch_size=batch_size,
                   precision=precision, confidence=confidence)
    if baselines is None:
        evaluate(models, baseline, data, judge, baseline_label=baseline_label, **options)
    else:
        evaluate_many(models, baselines, data, judge, **options)


def check_eval_stage(models: dict, data: str, judge: str, *, baseline: str | None = None,
                     baseline_label: str = "baseline", baselines: dict | None = None, n_samples: int = 1,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, kl_samples: int = 1, confidence: float = 0.95, **_) -> None:
    """eval_stage's keys checked before any stage of the recipe runs (references already
    replaced by the paths their stages will write): ValueError for the first bad one."""
    from posttrain.eval.run import check_options

    args = _eval_args(models, baseline, baseline_label, baselines, n_samples, max_new_tokens, temperature, top_p,
                      top_k, seed, kl_samples, confidence)
    check_options(models, args["baselines"], judge, n_samples, args["params"], kl_samples, confidence)


def _eval_args(models, baseline, baseline_label, baselines, n_samples, max_new_tokens, temperature, top_p, top_k,
               seed, kl_samples, confidence) -> dict:
    """{"baselines": {label: model}, "params": SamplingParams} of an eval stage's keys."""
    from posttrain.sampling import SamplingParams

    if not isinstance(models, dict) or not models:
        raise ValueError(f"eval: 'models' must be a non-empty mapping {{label: model}}, got {models!r}")
    if (baseline is None) == (baselines is None):
        raise ValueError("eval: give either 'baseline' (one model) or 'baselines' ({label: model}), not "
                         + ("both" if baseline is not None else "neither"))
    if baselines is not None and (not isinstance(baselines, dict) or not baselines):
        raise ValueError(f"eval: 'baselines' must be a non-empty mapping {{label: model}}, got {baselines!r}")
    for key, value in (("n_samples", n_samples), ("max_new_tokens", max_new_tokens), ("top_k", top_k),
                       ("seed", seed), ("kl_samples", kl_samples)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"eval: '{key}' must be an integer, got {value!r}")
    for key, value in (("temperature", temperature), ("top_p", top_p), ("confidence", confidence)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"eval: '{key}' must be a number, got {value!r}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed)
    return {"baselines": baselines if baselines is not None else {baseline_label: baseline}, "params": params}


def sample_stage(model: str, data: str, output: str, *, n: int = 4, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: list | None = None,
                 seed: int = 0, batch_size: int = 8, precision: str = "auto", max_prompt_length: int = 1024,
                 skip_invalid: bool = False) -> int | None:
    """`posttrain sample` with flat keys (SamplingParams' fields); returns its stopping signal."""
    from posttrain.sampling import SamplingParams
    from posttrain.sampling.files import sample_file

    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_strings=tuple(stop_strings or ()), seed=seed)
    return sample_file(model, data, output, params, batch_size=batch_size, precision=precision,
                       max_prompt_length=max_prompt_length, skip_invalid=skip_invalid)


def check_sample_stage(model: str, data: str, output: str = "", *, n: int = 4, max_new_tokens: int = 128,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: list | None = None,
                       seed: int = 0, batch_size: int = 8, precision: str = "auto", max_prompt_length: int = 1024,
                       skip_invalid: bool = False) -> None:
    """ValueError for a sample stage's setting out of range (n: 0, temperature: -1, batch_size: 0, an
    unknown precision), found before any stage runs rather than when this one's turn comes."""
    from posttrain.models.precision import PRECISIONS
    from posttrain.sampling import SamplingParams
    from posttrain.sampling.files import check_sample_settings

    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_strings=tuple(stop_strings or ()), seed=seed)
    check_sample_settings(params, batch_size=batch_size, max_prompt_length=max_prompt_length, as_flags=False)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
