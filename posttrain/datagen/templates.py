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
A slot's value is a string or a number (a null, a boolean, an object or a list is an error, so no
Python repr ends up in a prompt); `options` is a list of strings, and where a task lists them and
the record has none, it is the task's list. With options, `label` is one of them, or an integer
index into them (how `datasets` ClassLabel columns store labels); anything else is an error.

Templates render in Jinja2's sandbox with undefined variables as errors, and every record must
fill every slot of its task's templates, so a file either renders whole or fails on its first
bad record with a one-line error naming the template, the slot and the record. An error while
rendering (`{{ 1/0 }}`, `{{ text + 1 }}`, a sandbox violation) names the template file and line
too. The sandbox also bounds what one text may cost: MAX_TEXT characters of output, MAX_LOOP
items from `range` in all, and `*` / `**` results of that order. A phrasing is drawn per record
from one seeded stream (`per_record` distinct ones each), so the same seed gives the same file.

Each output line is `{"prompt", "completion", "template": {"task", "id", "source_index"}}`,
which `posttrain sft` reads unchanged (it ignores the provenance object). An existing output
file is replaced, atomically, once every record has rendered.
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
NULL = object()

MAX_TEXT = 1_000_000
"""Characters one rendered prompt or completion may have (a long document is ~100 k)."""
MAX_LOOP = 1_000_000
"""Items `range` may give in all while one text renders (Jinja2's sandbox bounds one call only)."""


def _count(n: int, noun: str) -> str:
    """"1 record", "2 records"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class Template:
    """One phrasing of a task: Jinja2 sources for the prompt and the completion (from a file:
    strings that know their file line, for error messages), where they come from (`file`,
    1-based `line` of the entry), and the slots they read."""

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
        return (f"read {_count(self.records, 'record')} from {source}; wrote "
                f"{_count(self.written, 'instruction pair')} (task {self.task}, "
                f"{_count(len(self.per_template), 'phrasing')}: {spread}) to {output}")


# ---------------------------------------------------------------------------------------------
# Loading template files


def _environment():
    """Sandboxed (a template file may come from anyone) and strict: an undefined slot is an
    error, never an empty string. Blocks drop their own line breaks, so a `{% for %}` listing
    options reads naturally in a YAML block string. `*` and `**` are checked so that one
    operator cannot build a gigabyte string or a million-digit number."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment, SecurityError

    class Bounded(SandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                sequence, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) \
                        and len(sequence) * times > MAX_TEXT:
                    raise SecurityError(f"'*' would make {len(sequence) * times} items, more than {MAX_TEXT}")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > 32 * MAX_TEXT:
                raise SecurityError(f"'**' would make a number of about {right * abs(left).bit_length()} bits")
            return super().call_binop(context, operator, left, right)

    return Bounded(undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True,
                   lstrip_blocks=True, keep_trailing_newline=False)


class _LoopBudget:
    """A `range` for one rendering that gives at most MAX_LOOP items over all its calls, so
    nested loops cannot run for hours."""

    def __init__(self):
        self.left = MAX_LOOP

    def range(self, *args):
        from jinja2.sandbox import SecurityError

        items = range(*args)
        self.left -= len(items)
        if self.left < 0:
            raise SecurityError(f"the loops' ranges give more than {MAX_LOOP} items in all")
        return items


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
        # prompt and completion stay _Located, so that render errors can name their file line.
        templates.append(Template(name, str(tid), prompt, completion, str(path), tid.line,
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
    """`"slot=column,slot=column"` → {slot: column}; "" → {}. An empty entry (`a=b,,c=d`, a
    trailing comma) is an error: it is most likely a mapping that was lost."""
    mapping: dict[str, str] = {}
    if not text.strip():
        return mapping
    for number, item in enumerate((part.strip() for part in text.split(",")), start=1):
        if not item:
            raise ValueError(f"--fields {text!r}: entry {number} is empty; expected SLOT=COLUMN,SLOT=COLUMN")
        slot, sep, column = (s.strip() for s in item.partition("="))
        if not (sep and slot and column):
            raise ValueError(f"--fields: {item!r} is not SLOT=COLUMN")
        if slot in mapping:
            raise ValueError(f"--fields: slot {slot!r} mapped twice")
        mapping[slot] = column
    return mapping


def _lookup(record: dict, column: str) -> Any:
    """The value at a dotted path (`answers.text.0`), MISSING where the path leads nowhere, or
    NULL where it passes or ends at a null."""
    value: Any = record
    for key in column.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return MISSING
        if value is None:
            return NULL
    return value


def slot_values(record: dict, task: Task, fields: dict[str, str], *, source: str, index: int) -> dict[str, Any]:
    """The values of `task`'s slots for one record (0-based `index` in `source`).

    ValueError naming source, record (1-based) and slot: a mapped column the record lacks, a
    slot that some template reads and the record does not fill or holds null in (naming that
    template), a value that is no string or number (`options`: no list of strings), a label
    that is neither one of the options nor an index into them.
    """
    from posttrain.data.errors import short_repr, type_name

    where = f"{source}: record {index + 1}"
    values = {}
    for slot in task.slots:
        column = fields.get(slot, slot)
        value = _lookup(record, column)
        if value in (MISSING, NULL) and slot == "options" and task.options:
            value = task.options
        if value is MISSING or value is NULL:
            user = next(t for t in task.templates if slot in t.slots)
            hint = (f"--fields {slot}={column} names no column of it" if slot in fields and value is MISSING
                    else f"map a column to it with --fields {slot}=COLUMN")
            state = (f"which the record lacks (its fields: {', '.join(sorted(record))})" if value is MISSING
                     else f"but the record's {column!r} is null")
            raise ValueError(f"{where}: template {user.name!r} needs slot {slot!r}, {state}; {hint}")
        if slot == "options":
            if not (isinstance(value, list) and value and all(isinstance(o, str) for o in value)):
                raise ValueError(f"{where}: slot 'options' (column {column!r}): expected a non-empty list of "
                                 f"strings, got {type_name(value)} {short_repr(value)}")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: slot {slot!r} (column {column!r}): expected a string or a number, got "
                             f"{type_name(value)} {short_repr(value)}")
        values[slot] = value
    label, options = values.get("label"), values.get("options")
    if "label" in values and options is not None:
        if isinstance(label, int):
            if not 0 <= label < len(options):
                raise ValueError(f"{where}: slot 'label': {label} is no index into the {len(options)} options "
                                 f"{short_repr(options)}")
            values["label"] = options[label]
        elif label not in options:
            raise ValueError(f"{where}: slot 'label': {short_repr(label)} is not one of the {len(options)} options "
                             f"{short_repr(options)} nor an index into them")
    return values


def _render_bounded(compiled, values: dict[str, Any]) -> str:
    """The text `compiled` renders on `values`, at most MAX_TEXT characters, with MAX_LOOP
    `range` items in all (SecurityError past either)."""
    from jinja2.sandbox import SecurityError

    chunks, size = [], 0
    for chunk in compiled.generate({**values, "range": _LoopBudget().range}):
        size += len(chunk)
        if size > MAX_TEXT:
            raise SecurityError(f"the text passes {MAX_TEXT} characters")
        chunks.append(chunk)
    return "".join(chunks)


def _template_line(err: BaseException) -> int | None:
    """The template line the error was raised on: Jinja2 rewrites tracebacks so that a
    template's frames carry the file name "<template>" and its own line numbers."""
    line, tb = None, err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line



def render(template: Template, values: dict[str, Any], *, source: str, index: int) -> dict[str, str]:
    """{"prompt", "completion"} of `template` on one record's slot values, each stripped.
    ValueError naming record, template, template file and line if rendering fails (a Jinja2
    or Python error, the sandbox's bounds) or gives an empty text."""
    import jinja2

    # What a template can raise while rendering: Jinja2's errors (undefined slots, the sandbox's
    # SecurityError) and Python's from the operations it runs ({{ 1/0 }}, {{ text + 1 }}, 10 ** -1 // 0).
    errors = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError)
    where = f"{source}: record {index + 1}: template {template.name!r}"
    out = {}
    for part, compiled in zip(("prompt", "completion"), template.compiled):
        try:
            text = _render_bounded(compiled, values).strip()
        except errors as err:
            text_source, line = getattr(template, part), _template_line(err)
            if line is not None and isinstance(text_source, _Located):
                at = text_source.file_line(line)
            else:
                at = f"line {template.line}" + (f" (line {line} of the {part})" if line else "")
            message = (str(err).splitlines() or [""])[0]
            raise ValueError(f"{where}: {part} ({template.file}: {at}): {type(err).__name__}: {message}") from None
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
    check_output(output, source)
    if templates is not None and Path(output).resolve() == Path(templates).resolve():
        raise ValueError(f"--output {output} is the --templates file itself")
    chosen = get_task(load_templates(templates), task, templates or "the template library")
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
    p.add_argument("--output", required=True,
                   help="JSONL of {prompt, completion, template} for `posttrain sft`; an existing file is "
                        "replaced (atomically, once every record has rendered)")
    return p


def run(args: argparse.Namespace) -> int:
    template_file(args.source, args.task, args.output, templates=args.templates, fields=args.fields,
                  per_record=args.per_record, seed=args.seed)
    return 0
