"""`posttrain data template`: instruction pairs from a supervised task dataset, by templates.

This is the Flan recipe (Wei et al. 2022, "Finetuned Language Models Are Zero-Shot Learners",
the section on tasks and templates; Longpre et al. 2023, "The Flan Collection"): each record of an existing NLP dataset
(a sentence and its translation, a review and its sentiment label) is written out as an
instruction and its answer by one of several hand-written phrasings of the task, so the model
learns the task rather than one wording. Phrasings include ones that list the answer options
in the prompt and ones that ask for a short answer or a full sentence.

A template file is YAML holding Jinja2 strings, one or more tasks per file:

    tasks:
      sentiment:
        description: Say whether a text is positive or negative.
        options: [negative, positive]        # optional: the label set, for classification
        templates:
          - id: options_listed
            prompt: "{{ text }}\\n\\nIs this review {{ options | join(' or ') }}?"
            completion: "{{ label }}"

A template's *slots* are the variables it reads (`text`, `label`, `options` above). Each
record's slots are its fields of those names, or the columns `fields` maps to them
(`{"text": "review", "answer": "answers.text.0"}`: a dotted path reads into objects and lists).
`options`, where a task lists them and the record has none, is the task's list; an integer
`label` with options is an index into them (how `datasets` ClassLabel columns store labels).

Templates render in Jinja2's sandbox with undefined variables as errors, and every record must
fill every slot of its task's templates, so a file either renders whole or fails on its first
bad record with a one-line error naming the template, the slot and the record. A phrasing is
drawn per record from one seeded stream (`per_record` distinct ones each), so the same seed
gives the same file.

Each output line is `{"prompt", "completion", "template": {"task", "id", "source_index"}}`,
which `posttrain sft` reads unchanged (it ignores the provenance object).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIBRARY = Path(__file__).with_name("templates")
"""The shipped template files, one per task kind; every *.yaml in it is loaded."""

TASK_KEYS = {"description", "options", "templates"}
TEMPLATE_KEYS = {"id", "prompt", "completion"}
MISSING = object()


@dataclass
class Template:
    """One phrasing of a task: Jinja2 sources for the prompt and the completion, where they
    come from (`file`, 1-based `line` of the entry), and the slots they read."""

    task: str
    id: str
    prompt: str
    completion: str
    file: str
    line: int
    slots: frozenset[str]
    compiled: tuple[Any, Any] = field(repr=False, compare=False)
    """The compiled (prompt, completion) jinja2 Templates."""

    @property
    def name(self) -> str:
        return f"{self.task}/{self.id}"


@dataclass
class Task:
    """A task's templates, and its answer options when it is a classification task."""

    name: str
    description: str
    templates: list[Template]
    options: list[str] | None
    file: str

    @property
    def slots(self) -> list[str]:
        """Every slot any of its templates reads, sorted."""
        return sorted(set().union(*(t.slots for t in self.templates)))


@dataclass
class TemplateSummary:
    """What `template_file` did, for its closing line."""

    records: int = 0
    written: int = 0
    task: str = ""
    per_template: Counter = field(default_factory=Counter)
    """Pairs written, by template id."""

    def line(self, source: str, output: str) -> str:
        spread = ", ".join(f"{tid} {n}" for tid, n in sorted(self.per_template.items()))
        return (f"read {self.records} records from {source}; wrote {self.written} instruction pairs "
                f"(task {self.task}, {len(self.per_template)} phrasings: {spread}) to {output}")


# ---------------------------------------------------------------------------------------------
# Loading template files


def _environment():
    """Sandboxed (a template file may come from anyone) and strict: an undefined slot is an
    error, never an empty string. Blocks drop their own line breaks, so a `{% for %}` listing
    options reads naturally in a YAML block string."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True,
                                lstrip_blocks=True, keep_trailing_newline=False)


def _yaml_with_lines(path: Path) -> Any:
    """The YAML document at `path`, with every string a `_Located` str that knows its line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def located(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Located:
        return _Located(loader.construct_scalar(node), node.start_mark.line + 1, node.style)

    Loader.add_constructor("tag:yaml.org,2002:str", located)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: {where}not valid YAML ({problem})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


class _Located(str):
    """A YAML string that remembers the file line it starts on and its style ("|" literal
    block: its k-th line is file line `line + k`, the block's content starting one line down)."""

    def __new__(cls, value: str, line: int, style: str | None):
        text = super().__new__(cls, value)
        text.line, text.style = line, style
        return text

    def file_line(self, template_line: int) -> str:
        if self.style == "|":
            return f"line {self.line + template_line}"
        # Folded, quoted or plain strings do not keep the file's line breaks.
        return f"line {self.line} (line {template_line} of the string)"


def _compile(env, source: str, path: Path, name: str, part: str):
    import jinja2

    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        where = source.file_line(err.lineno) if isinstance(source, _Located) else f"template line {err.lineno}"
        raise ValueError(f"{path}: {where}: template {name!r} {part}: Jinja2 syntax error: {err.message}") from None


def _slots(env, *sources: str) -> frozenset[str]:
    from jinja2 import meta

    return frozenset().union(*(meta.find_undeclared_variables(env.parse(s)) for s in sources))


def _expect(value: Any, kind: type, path: Path, where: str) -> Any:
    if not isinstance(value, kind):
        from posttrain.data.errors import short_repr, type_name

        raise ValueError(f"{path}: {where}: expected {'a string' if kind is str else 'a ' + kind.__name__}, "
                         f"got {type_name(value)} {short_repr(value)}")
    return value


def _task(env, path: Path, name: str, spec: Any) -> Task:
    _expect(spec, dict, path, f"task {name!r}")
    unknown = set(spec) - TASK_KEYS
    if unknown:
        raise ValueError(f"{path}: task {name!r}: unknown keys {sorted(unknown)}; expected {sorted(TASK_KEYS)}")
    options = spec.get("options")
    if options is not None and not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
        raise ValueError(f"{path}: task {name!r}: options: expected a non-empty list of strings, got {options!r}")
    entries = _expect(spec.get("templates"), list, path, f"task {name!r}: templates")
    if not entries:
        raise ValueError(f"{path}: task {name!r}: no templates")
    templates, seen = [], set()
    for number, entry in enumerate(entries, start=1):
        where = f"task {name!r}: template {number}"
        _expect(entry, dict, path, where)
        if set(entry) != TEMPLATE_KEYS:
            raise ValueError(f"{path}: {where}: keys {sorted(entry)}; expected exactly {sorted(TEMPLATE_KEYS)}")
        tid = _expect(entry["id"], str, path, f"{where}: id")
        if tid in seen:
            raise ValueError(f"{path}: line {tid.line}: task {name!r}: template id {tid!r} used twice")
        seen.add(tid)
        prompt = _expect(entry["prompt"], str, path, f"{where}: prompt")
        completion = _expect(entry["completion"], str, path, f"{where}: completion")
        compiled = (_compile(env, prompt, path, f"{name}/{tid}", "prompt"),
                    _compile(env, completion, path, f"{name}/{tid}", "completion"))
        templates.append(Template(name, str(tid), str(prompt), str(completion), str(path), tid.line,
                                  _slots(env, prompt, completion), compiled))
    return Task(name, str(spec.get("description", "")), templates, options and [str(o) for o in options], str(path))


def load_template_file(path: str | Path) -> dict[str, Task]:
    """The tasks of one template file (see the module docstring for its format).

    ValueError, one line naming the file (and line where known): unreadable or invalid YAML, a
    task or template entry of the wrong shape, a duplicate template id, a Jinja2 syntax error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such template file")
    document = _yaml_with_lines(path)
    if not (isinstance(document, dict) and set(document) == {"tasks"} and isinstance(document["tasks"], dict)
            and document["tasks"]):
        raise ValueError(f"{path}: expected a mapping with one key 'tasks' holding task name → task")
    env = _environment()
    return {str(name): _task(env, path, str(name), spec) for name, spec in document["tasks"].items()}


def load_templates(path: str | Path | None = None) -> dict[str, Task]:
    """Task name → Task: those of `path`, or of every file of the shipped library (None).
    A task defined in two library files is an error."""
    if path is not None:
        return load_template_file(path)
    tasks: dict[str, Task] = {}
    for file in sorted(LIBRARY.glob("*.yaml")):
        for name, task in load_template_file(file).items():
            if name in tasks:
                raise ValueError(f"{file}: task {name!r} is also defined in {tasks[name].file}")
            tasks[name] = task
    return tasks


def get_task(tasks: dict[str, Task], name: str, where: str = "the template library") -> Task:
    """tasks[name], or a ValueError listing the known tasks."""
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} in {where}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


# ---------------------------------------------------------------------------------------------
# Records → slot values → rendered pairs


def parse_fields(text: str) -> dict[str, str]:
    """`"slot=column,slot=column"` → {slot: column}; "" → {}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        slot, sep, column = (s.strip() for s in item.partition("="))
        if not (sep and slot and column):
            raise ValueError(f"--fields: {item!r} is not SLOT=COLUMN")
        if slot in mapping:
            raise ValueError(f"--fields: slot {slot!r} mapped twice")
        mapping[slot] = column
    return mapping


def _lookup(record: dict, column: str) -> Any:
    """The value at a dotted path (`answers.text.0`), or MISSING; a null counts as missing."""
    value: Any = record
    for key in column.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return MISSING
        if value is None:
            return MISSING
    return value


def slot_values(record: dict, task: Task, fields: dict[str, str], *, source: str, index: int) -> dict[str, Any]:
    """The values of `task`'s slots for one record (0-based `index` in `source`).

    ValueError naming source, record (1-based) and slot: a mapped column the record lacks, a
    slot that some template reads and the record does not fill (naming that template), an
    integer label out of the options' range.
    """
    from posttrain.data.errors import short_repr

    where = f"{source}: record {index + 1}"
    values = {}
    for slot in task.slots:
        column = fields.get(slot, slot)
        value = _lookup(record, column)
        if value is MISSING and slot == "options" and task.options:
            value = task.options
        if value is MISSING:
            user = next(t for t in task.templates if slot in t.slots)
            hint = (f"--fields {slot}={column} names no column of it" if slot in fields
                    else f"map a column to it with --fields {slot}=COLUMN")
            raise ValueError(f"{where}: template {user.name!r} needs slot {slot!r}, which the record lacks "
                             f"(its fields: {', '.join(sorted(record))}); {hint}")
        values[slot] = value
    label, options = values.get("label"), values.get("options")
    if isinstance(label, int) and not isinstance(label, bool) and isinstance(options, list):
        if not 0 <= label < len(options):
            raise ValueError(f"{where}: slot 'label': {label} is no index into the {len(options)} options "
                             f"{short_repr(options)}")
        values["label"] = options[label]
    return values


def render(template: Template, values: dict[str, Any], *, source: str, index: int) -> dict[str, str]:
    """{"prompt", "completion"} of `template` on one record's slot values, each stripped.
    ValueError naming template and record if rendering fails or gives an empty text."""
    import jinja2

    where = f"{source}: record {index + 1}: template {template.name!r}"
    out = {}
    for part, compiled in zip(("prompt", "completion"), template.compiled):
        try:
            text = compiled.render(values).strip()
        except jinja2.TemplateError as err:  # sandbox violations and strict undefined inside slots
            raise ValueError(f"{where}: {part}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        if not text:
            raise ValueError(f"{where}: {part} renders empty")
        out[part] = text
    return out


def instruction_pairs(records: list[dict], task: Task, *, fields: dict[str, str] | None = None, per_record: int = 1,
                      seed: int = 0, source: str = "<records>") -> list[dict]:
    """`per_record` instruction pairs per record, each by a different phrasing of `task` drawn
    with `random.Random(seed)` (one stream over the records, so the result depends on the seed
    and the records only), in record order."""
    fields = fields or {}
    unknown = sorted(set(fields) - set(task.slots))
    if unknown:
        raise ValueError(f"--fields: task {task.name!r} has no slot {', '.join(map(repr, unknown))}; "
                         f"its slots: {', '.join(task.slots)}")
    if not 1 <= per_record <= len(task.templates):
        raise ValueError(f"--per-record {per_record}: expected 1 to {len(task.templates)} "
                         f"(the phrasings of task {task.name!r})")
    rng = random.Random(seed)
    pairs = []
    for index, record in enumerate(records):
        values = slot_values(record, task, fields, source=source, index=index)
        for pick in rng.sample(range(len(task.templates)), per_record):
            template = task.templates[pick]
            pairs.append({**render(template, values, source=source, index=index),
                          "template": {"task": task.name, "id": template.id, "source_index": index}})
    return pairs


def template_file(source: str, task: str, output: str, *, templates: str | None = None, fields: str = "",
                  per_record: int = 1, seed: int = 0) -> TemplateSummary:
    """Read `source` (JSONL/JSON/CSV/Parquet file, `save_to_disk` folder or hub id, as
    `posttrain.data.read_records` reads them), write its instruction pairs to `output`
    (atomically, only once every record rendered), print and return the summary."""
    from posttrain.data.records import read_records
    from posttrain.scoring.files import check_output, write_jsonl_atomic

    mapping = parse_fields(fields)
    chosen = get_task(load_templates(templates), task, templates or "the template library")
    check_output(output, source)
    records = read_records(source)
    pairs = instruction_pairs(records, chosen, fields=mapping, per_record=per_record, seed=seed, source=source)
    write_jsonl_atomic(output, pairs)
    summary = TemplateSummary(len(records), len(pairs), chosen.name, Counter(p["template"]["id"] for p in pairs))
    print(summary.line(source, output))
    return summary


# ---------------------------------------------------------------------------------------------
# Command line (registered in posttrain.datagen.cli)


def add_parser(data_sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = data_sub.add_parser(name, help="Instruction pairs from a task dataset by templates (Flan-style).")
    p.add_argument("--source", required=True, metavar="FILE|FOLDER|HUB_ID",
                   help="records: .jsonl/.json/.csv/.parquet, a datasets save_to_disk folder, or a hub id[:split]")
    p.add_argument("--task", required=True, help="task name, e.g. translation, summarization, qa, sentiment")
    p.add_argument("--templates", default=None, metavar="FILE",
                   help="YAML template file (default: the shipped library)")
    p.add_argument("--fields", default="", metavar="SLOT=COLUMN,…",
                   help="read a slot from another column, e.g. text=document,answer=answers.text.0")
    p.add_argument("--per-record", type=int, default=1, help="distinct phrasings written per record (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phrasing draw (default: 0)")
    p.add_argument("--output", required=True, help="JSONL of {prompt, completion, template} for `posttrain sft`")
    return p


def run(args: argparse.Namespace) -> int:
    template_file(args.source, args.task, args.output, templates=args.templates, fields=args.fields,
                  per_record=args.per_record, seed=args.seed)
    return 0
