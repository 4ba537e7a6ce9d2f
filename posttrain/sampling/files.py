"""`posttrain sample`: K responses to every prompt of a file, appended prompt by prompt.

Each output line is the prompt's source record plus
  "responses": K strings, "finish_reasons": K of eos | stop | length,
  "prompt_index": the record's 0-based position in the prompt file,
  "sampling": the provenance (model, every sampling setting, base seed, precision).
Lines are appended as soon as their prompts are done, one whole line per write. Re-running the
same command continues after the last complete line: a partial last line (a killed run) is
dropped first, and because every sequence's random stream depends only on (seed, prompt index,
sample index), the finished file is the one an uninterrupted run writes.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from posttrain.data import TokenizedPrompt, load_prompts
from transformers import AutoConfig

from posttrain.models import load_causal_lm, load_tokenizer, resolve_model_path
from posttrain.models.precision import resolve_precision
from posttrain.sampling.sampler import Sampler, SamplingParams


def provenance(model: str, params: SamplingParams, precision: str) -> dict:
    """What produced a samples file; a re-run continues it only if this is unchanged."""
    settings = asdict(params)
    settings["stop_strings"] = list(params.stop_strings)
    return {"model": model, **settings, "precision": precision}


def finished_prompts(output: Path, prompts: list[TokenizedPrompt], expected: dict) -> set[int]:
    """Source indices already in `output`, after dropping a partial last line (the only damage
    an interrupted append can leave). ValueError if the file was made with other settings or
    from other prompts, naming the line and the field."""
    text = output.read_text()
    complete = text[: text.rfind("\n") + 1]   # a cut-short last write has no newline yet
    by_index = {p.source_index: p for p in prompts}
    done = set()
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{output}: line {number}: not JSON ({err.msg}); it is not a samples file of this "
                             "command — choose another --output") from None
        where = f"{output}: line {number}"
        if not isinstance(record, dict) or "sampling" not in record or "prompt_index" not in record:
            raise ValueError(f"{where}: no 'sampling' and 'prompt_index' fields; not a samples file to continue")
        for key, value in expected.items():
            if record["sampling"].get(key) != value:
                raise ValueError(f"{where}: field 'sampling.{key}' is {record['sampling'].get(key)!r}, this run has "
                                 f"{value!r}; use the same settings to continue it, or another --output")
        index = record["prompt_index"]
        if index not in by_index or by_index[index].record.get("prompt") != record.get("prompt") \
                or by_index[index].record.get("messages") != record.get("messages"):
            raise ValueError(f"{where}: field 'prompt_index' {index!r} names no such prompt in the prompt file "
                             "(was it changed?); use another --output")
        done.add(index)
    if complete != text:
        output.write_text(complete)
        print(f"{output}: dropped a partial last line (an interrupted write)", file=sys.stderr)
    return done


@contextmanager
def stop_on_signal():
    """Yields a list that gets the signal number on SIGINT / SIGTERM, so the loop stops between
    two prompts' writes instead of in the middle of one."""
    caught: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def check_sample_settings(params: SamplingParams, *, batch_size: int, max_prompt_length: int,
                          as_flags: bool = True) -> None:
    """ValueError for a setting of `sample_file` that no model or data could make usable (a
    recipe checks its sample stages so, before any stage runs, with as_flags=False: the settings
    are then named as its keys, batch_size, not as the command's flags, --batch-size)."""
    params.validate()
    for key, value in (("batch_size", batch_size), ("max_prompt_length", max_prompt_length)):
        if value < 1:
            name = "--" + key.replace("_", "-") if as_flags else key
            raise ValueError(f"{name}={value} must be ≥ 1")


def sample_file(model: str, data: str, output: str, params: SamplingParams, *, batch_size: int = 8,
                precision: str = "auto", max_prompt_length: int = 1024, skip_invalid: bool = False) -> int | None:
    """Write params.n responses per prompt record of `data` to the JSONL file `output`.

    Every prompt is validated (and the settings checked) before the model loads or `output` is
    touched. Returns the signal number if SIGINT / SIGTERM stopped the run (every line written
    is complete; re-run to continue), None when every prompt is in the file.
    Errors: ValueError for a bad record, setting or existing output of other settings.
    """
    check_sample_settings(params, batch_size=batch_size, max_prompt_length=max_prompt_length)
    positions = getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "max_position_embeddings", None)
    if positions is not None and max_prompt_length + params.max_new_tokens > positions:
        raise ValueError(f"--max-prompt-length={max_prompt_length} + --max-new-tokens={params.max_new_tokens} "
                         f"passes the {positions} positions of {model}")
    out = Path(output)
    if out.resolve() == Path(data).resolve():
        raise ValueError(f"--output {output} is the prompt file itself")
    if not out.parent.is_dir():
        raise ValueError(f"--output {output}: folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name")
    resolved = resolve_precision(precision)
    tokenizer = load_tokenizer(model)
    prompts, report = load_prompts(data, tokenizer, max_prompt_length=max_prompt_length, skip_invalid=skip_invalid)
    print(report.summary(), file=sys.stderr)
    expected = provenance(model, params, resolved)
    done = finished_prompts(out, prompts, expected) if out.exists() else set()
    todo = [p for p in prompts if p.source_index not in done]
    if not todo:
        print(f"{output}: all {len(prompts)} prompts already sampled", file=sys.stderr)
        return None
    if done:
        print(f"{output}: continuing after {len(done)} prompts already sampled", file=sys.stderr)
    sampler = Sampler(load_causal_lm(model), tokenizer, precision=resolved, batch_size=batch_size)
    per_chunk = max(1, batch_size // params.n)
    with stop_on_signal() as caught, out.open("a") as f, \
            tqdm(total=len(prompts), initial=len(done), desc="sample", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(todo), per_chunk):
            chunk = todo[start: start + per_chunk]
            gen = sampler.generate(chunk, params)
            for i, prompt in enumerate(chunk):
                rows = [r for r in range(len(gen.responses)) if gen.prompt_index[r] == i]
                record = {**prompt.record, "responses": [gen.responses[r] for r in rows],
                          "finish_reasons": [gen.finish_reasons[r] for r in rows],
                          "prompt_index": prompt.source_index, "sampling": expected}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
            if caught:
                left = len(todo) - start - len(chunk)
                print(f"posttrain sample: stopped by signal {caught[0]} with {left} prompts to go; "
                      "re-run the same command to continue", file=sys.stderr)
                return caught[0] if left else None
    print(f"wrote {len(todo)} prompts × {params.n} responses to {output}; it holds all {len(prompts)} prompts",
          file=sys.stderr)
    return None
