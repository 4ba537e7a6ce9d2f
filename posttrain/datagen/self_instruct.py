"""`posttrain data generate`: instruction data written by a language model, self-instruct style.

Self-Instruct (Wang et al. 2023, §2.1–2.3) grows a task pool from a few seed tasks: each round
the model is shown the annotation guidelines and a few tasks drawn from the pool, writes a new
one, and the new task joins the pool only if it passes the filters. Here a task is an
instruction, an optional input and an output, written in one go as Alpaca did (Taori et al.
2023). The prompt shows `examples` tasks, `generated_examples` of them drawn from the accepted
ones once there are any, and the assistant turn starts with the next task's header, so even a
small model answers in the format. The paper shows 8 tasks (6 seed, 2 generated); the default
here is 3 (2 and 1), because on a CPU the prompt's tokens are much of a round's cost. Each
prompt gets `samples_per_prompt` independent samples, which share its computed prompt, as the
paper has each prompt yield several new tasks.

Filters, applied in this order; a candidate is counted under the first one it fails:

* unparsable — no "Instruction:" line followed by an "Output:" line;
* empty field — an empty instruction or output (the input may be empty: <noinput>);
* cut off — the generation reached max_new_tokens, so its output is over-long and unfinished;
* instruction length — fewer than `min_instruction_words` or more than `max_instruction_words`
  words (4 and 150: the released self-instruct code drops instructions of ≤ 3 or > 150 words);
* blocklisted word — the instruction names something a text model cannot do, matched as whole
  words in any case (BLOCKLIST: the self-instruct release's list plus Alpaca's additions);
* near-duplicate — ROUGE-L F1 (the `rouge-score` package) with some pool instruction ≥
  `rouge_threshold` (0.7: "added to the task pool only when its ROUGE-L similarity with any
  existing instruction is less than 0.7", §2.3). Candidates of one round are compared in slot
  order (prompt by prompt, sample by sample), each against the pool including those accepted
  before it.

Each output line is `{"instruction", "input", "output", "self_instruct": {...}}`, an Alpaca
record `posttrain sft` reads (it ignores the provenance object), numbered "gen-0", "gen-1", … .

Resuming: round r draws its prompts' examples from random.Random(seed, r), and sample j of its
prompt i comes from the sampler's stream for (seed, prompt r·prompts_per_round + i, sample j),
so a round depends only on the pool before it: the seed tasks plus the file's records of earlier
rounds. A round's accepted lines are appended in one write. A re-run of the same command drops
a partial last line and the records of the last round in the file (a killed write may have cut
that round short), then redoes that round: the finished file is the one an uninterrupted run
writes. A signal (SIGINT, SIGTERM) stops the run after the round in progress.

`max_attempts` bounds the candidates sampled over the file's rounds, counted from round 0: the
last round it reaches is cut to the attempts left (its first prompts' samples, in slot order,
the same candidates a whole round starts with). Only rounds that accepted a record leave a
trace in the file, so a re-run continues from the last round in the file and samples again the
rounds after it that accepted nothing (all of them, from round 0, when none did): a re-run with
a larger `max_attempts` writes the file a single run with that bound writes, but may sample more
than the difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import logging
import re
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import argparse

    from posttrain.data import TokenizedPrompt
    from posttrain.sampling import SamplingParams

TEMPLATE_ID = "self-instruct-v1"
"""Name of PROMPT_TEMPLATE; its hash goes into every record's provenance too."""

PROMPT_TEMPLATE = """{guidelines}

Below are {count} example tasks. Each has an instruction, an input (<noinput> when the instruction \
needs none) and the output a helpful assistant would give.

{examples}

Write task {next}: one new task, different from the examples, in exactly the same format."""
"""The user turn; the assistant turn then starts with TASK_HEADER and "Instruction:"."""

TASK_FORMAT = "Task {number}\nInstruction: {instruction}\nInput: {input}\nOutput: {output}"
TASK_HEADER = "Task {number}\n"
NO_INPUT = "<noinput>"

BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
"""Words an instruction for a text-only model should not contain: the list of the self-instruct
release (bootstrap_instructions.py, up to "go to") and the five Alpaca added."""

FILTERS = ("unparsable", "empty field", "cut off at max_new_tokens", "instruction length", "blocklisted word",
           "near-duplicate")
"""Counter keys of the filters, in the order they are applied."""

LABEL = re.compile(r"^[ \t]*(instruction|input|output)[ \t]*:", re.IGNORECASE | re.MULTILINE)
NEXT_TASK = re.compile(r"^[ \t]*(#+[ \t]*)?Task[ \t]+\d+[ \t]*:?[ \t]*$", re.IGNORECASE | re.MULTILINE)

Complete = Callable[[list["TokenizedPrompt"], "SamplingParams"], list[tuple[str, str]]]
"""(prompts, params) → params.n (text after the prompt, finish reason) per prompt, prompt by
prompt (the order of Sampler.generate's rows)."""


@dataclass(frozen=True)
class Task:
    """One pool task: a seed task, or an accepted generated one ("gen-N")."""

    id: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class GenerateSettings:
    """Everything besides the model and sampling that decides which records a run writes."""

    examples: int = 3
    """Tasks shown in each prompt."""
    generated_examples: int = 1
    """Up to this many of them come from the generated tasks (paper: 2 of 8)."""
    prompts_per_round: int = 2
    """Prompts per round, each showing its own draw of tasks."""
    samples_per_prompt: int = 4
    """Candidates sampled from each prompt; a round's prompts × samples are one sampler batch."""
    rouge_threshold: float = 0.7
    """Drop a candidate whose ROUGE-L F1 with a pool instruction is at least this."""
    min_instruction_words: int = 4
    """Drop instructions with fewer words."""
    max_instruction_words: int = 150
    """Drop instructions with more words."""
    blocklist: tuple[str, ...] = BLOCKLIST
    """Drop instructions containing any of these words or phrases."""

    def validate(self) -> None:
        """ValueError naming the first setting no run could use."""
        checks = (("examples", self.examples >= 1, "must be ≥ 1"),
                  ("generated_examples", 0 <= self.generated_examples <= self.examples,
                   f"must be in [0, --examples={self.examples}]"),
                  ("prompts_per_round", self.prompts_per_round >= 1, "must be ≥ 1"),
                  ("samples_per_prompt", self.samples_per_prompt >= 1, "must be ≥ 1"),
                  ("rouge_threshold", 0 < self.rouge_threshold <= 1, "must be in (0, 1]"),
                  ("min_instruction_words", self.min_instruction_words >= 1, "must be ≥ 1"),
                  ("max_instruction_words", self.max_instruction_words >= self.min_instruction_words,
                   f"must be ≥ --min-instruction-words={self.min_instruction_words}"),
                  ("blocklist", all(w.strip() == w and w for w in self.blocklist),
                   "words must be non-empty without surrounding spaces"))
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} {why}")


@dataclass
class GenerateSummary:
    """What one `generate_file` call did, for its closing line."""

    sampled: int = 0
    """Candidates the model wrote."""
    unused: int = 0
    """Candidates of the last round not looked at: --n was reached before them."""
    accepted: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Candidates left out, by FILTERS key."""
    seconds: float = 0.0
    """Wall time of the rounds (model loading not included)."""
    total: int = 0
    """Records the output file holds at the end."""

    def line(self, output: str) -> str:
        examined = self.sampled - self.unused
        rate = (lambda k: f"{k / self.seconds:.3g}/s") if self.seconds > 0 else (lambda k: "-")
        parts = [f"sampled {self.sampled} candidates in {self.seconds:.1f} s ({rate(self.sampled)}); accepted "
                 f"{self.accepted} ({rate(self.accepted)}); {output} holds {self.total} records"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{self.dropped[k]} {k} ({self.dropped[k] / examined:.0%})"
                                                for k in FILTERS if self.dropped[k]))
        if self.unused:
            parts.append(f"{self.unused} of the last round unused")
        return "; ".join(parts)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_text(flag: str, path: str) -> str:
    """The UTF-8 text of the file `path` given to `flag`; a one-line error naming flag and file
    for a folder, a missing file or another encoding."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; expected a text file")
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
                         ) from None


def read_guidelines(path: str) -> str:
    """The guidelines text, stripped; error if the file is missing, a folder, not UTF-8 or holds
    only whitespace."""
    text = _read_text("--guidelines", path).strip()
    if not text:
        raise ValueError(f"--guidelines {path}: the file is empty; write the annotation guidelines the model follows")
    return text


def read_blocklist(path: str) -> tuple[str, ...]:
    """Words or phrases, one per line; blank lines and lines starting with '#' are skipped."""
    words = tuple(line.strip() for line in _read_text("--blocklist", path).splitlines())
    words = tuple(w for w in words if w and not w.startswith("#"))
    if not words:
        raise ValueError(f"--blocklist {path}: no words in the file (one word or phrase per line)")
    return words


def read_seed_tasks(path: str) -> list[Task]:
    """Seed tasks from records `{"instruction", "input"?, "output", "id"?}` (any format
    read_records reads). Errors name the file, record and field; ids default to "seed-N"."""
    from posttrain.data import RecordError, read_records

    if not Path(path).exists():
        raise FileNotFoundError(f"--seed-tasks {path}: no such file")
    tasks = []
    for number, record in enumerate(read_records(path), start=1):
        if not isinstance(record, dict):
            raise RecordError(path, number, "*", "expected an object", reason="record not an object")
        values = {}
        for name, required in (("instruction", True), ("input", False), ("output", True), ("id", False)):
            value = record.get(name)
            if value is None and not required:
                continue
            if not isinstance(value, str) or (required and not value.strip()):
                problem = "missing" if value is None else f"expected a non-empty string, got {value!r}"[:120]
                raise RecordError(path, number, name, problem, reason=f"bad field '{name}'")
            values[name] = value.strip()
        task_id = values.get("id") or f"seed-{number}"
        if task_id.startswith("gen-") or any(t.id == task_id for t in tasks):
            raise RecordError(path, number, "id", f"{task_id!r} is used twice or starts with 'gen-' (kept for "
                              "generated tasks)", reason="bad field 'id'")
        tasks.append(Task(task_id, values["instruction"], values.get("input", ""), values["output"]))
    return tasks


def draw_examples(seeds: list[Task], generated: list[Task], settings: GenerateSettings,
                  rng: random.Random) -> list[Task]:
    """`settings.examples` distinct pool tasks in random order: min(generated_examples,
    len(generated)) generated ones, the rest seed tasks (there must be enough of them)."""
    from_generated = min(len(generated), settings.generated_examples)
    shown = rng.sample(generated, from_generated) + rng.sample(seeds, settings.examples - from_generated)
    rng.shuffle(shown)
    return shown


def render_prompt(guidelines: str, shown: list[Task]) -> tuple[str, str]:
    """(the user turn, the start of the assistant turn) for a prompt showing `shown`."""
    examples = "\n\n".join(TASK_FORMAT.format(number=i, instruction=t.instruction, input=t.input or NO_INPUT,
                                              output=t.output) for i, t in enumerate(shown, start=1))
    user = PROMPT_TEMPLATE.format(guidelines=guidelines, count=len(shown), examples=examples, next=len(shown) + 1)
    return user, TASK_HEADER.format(number=len(shown) + 1) + "Instruction:"


def parse_task(text: str) -> tuple[str, str, str] | None:
    """(instruction, input, output) from text in TASK_FORMAT, or None without an "Instruction:"
    label followed by an "Output:" label. An "Input:" between the two is optional, and
    <noinput> means an empty input. The output ends at a following "Task N" header or at the
    next labelled line of any kind: the model has started another task."""
    text = NEXT_TASK.split(text, maxsplit=1)[0]
    labels = [(m.group(1).lower(), m) for m in LABEL.finditer(text)]
    instruction = next((m for name, m in labels if name == "instruction"), None)
    if instruction is None:
        return None
    output = next((m for name, m in labels if name == "output" and m.start() > instruction.start()), None)
    if output is None:
        return None
    given = next((m for name, m in labels if name == "input" and instruction.start() < m.start() < output.start()),
                 None)
    after = next((m.start() for _, m in labels if m.start() > output.start()), len(text))
    task_input = text[given.end(): output.start()].strip() if given else ""
    if task_input.lower() == NO_INPUT:
        task_input = ""
    body_end = given.start() if given else output.start()
    return text[instruction.end(): body_end].strip(), task_input, text[output.end(): after].strip()


def blocklisted(instruction: str, blocklist: tuple[str, ...]) -> str | None:
    """The first blocklist word or phrase that occurs in `instruction` as whole words, any case."""
    for word in blocklist:
        if re.search(rf"\b{re.escape(word)}\b", instruction, re.IGNORECASE):
            return word
    return None


def check_candidate(text: str, finish_reason: str,
                    settings: GenerateSettings) -> tuple[tuple[str, str, str] | None, str | None]:
    """(the parsed task, None) if it passes every filter but the near-duplicate one, else
    (None, the FILTERS key of the first filter it fails). `text` starts after "Instruction:"'s label."""
    fields = parse_task("Instruction:" + text)
    if fields is None:
        return None, "unparsable"
    instruction, _, output = fields
    if not instruction or not output:
        return None, "empty field"
    if finish_reason == "length":
        return None, "cut off at max_new_tokens"
    if not settings.min_instruction_words <= len(instruction.split()) <= settings.max_instruction_words:
        return None, "instruction length"
    if blocklisted(instruction, settings.blocklist):
        return None, "blocklisted word"
    return fields, None


def most_similar(instruction: str, pool: list[Task], scorer) -> tuple[float, str]:
    """(highest ROUGE-L F1 of `instruction` with a pool instruction, that task's id).

    rouge-score lower-cases and keeps only [a-z0-9] tokens, so text in other scripts scores 0."""
    best, best_id = 0.0, ""
    for task in pool:
        score = scorer.score(task.instruction, instruction)["rougeL"].fmeasure
        if score > best:
            best, best_id = score, task.id
    return best, best_id


def run_provenance(model: str, guidelines: str, seeds: list[Task], params: SamplingParams, precision: str,
                   settings: GenerateSettings) -> dict:
    """The provenance every record of a run shares; a re-run continues a file only if it is unchanged."""
    sampling = {**asdict(params), "stop_strings": list(params.stop_strings), "precision": precision}
    chosen = {**asdict(settings), "blocklist": sha256("\n".join(settings.blocklist))}
    return {"model": model, "template": TEMPLATE_ID,
            "template_sha256": sha256("\0".join((PROMPT_TEMPLATE, TASK_FORMAT, TASK_HEADER))),
            "guidelines_sha256": sha256(guidelines),
            "seed_tasks_sha256": sha256(json.dumps([asdict(t) for t in seeds], ensure_ascii=False)),
            "sampling": sampling, "settings": chosen}


def read_progress(output: Path, expected: dict) -> tuple[list[dict], int]:
    """(the complete records of `output`, the byte length of those before its last round).

    ValueError naming the line and field if a line is not a record of this command made with
    the `expected` provenance (another model, seed, guidelines, … : use another --output)."""
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if complete != data and not data[len(complete):].startswith(b'{"instruction": '[: len(data) - len(complete)]):
        raise ValueError(f"{output}: its last line is not the start of a record of `posttrain data generate`; "
                         "choose another --output")
    lines = complete.splitlines(keepends=True)
    records, ends = [], []
    for number, line in enumerate(lines, start=1):
        where = f"{output}: line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{where}: not JSON; it is not a file of `posttrain data generate` to continue — "
                             "choose another --output") from None
        made = record.get("self_instruct") if isinstance(record, dict) else None
        if not isinstance(made, dict) or not all(isinstance(record.get(k), str) for k in ("instruction", "input",
                                                                                          "output")):
            raise ValueError(f"{where}: no string fields 'instruction', 'input', 'output' and a 'self_instruct' "
                             "object; not a file of `posttrain data generate` to continue — choose another --output")
        for key, value in expected.items():
            if made.get(key) != value:
                raise ValueError(f"{where}: field 'self_instruct.{key}' is {made.get(key)!r}, this run has {value!r}; "
                                 "use the same settings to continue it, or another --output")
        if made.get("id") != f"gen-{len(records)}" or not isinstance(made.get("round"), int) \
                or (records and made["round"] < records[-1]["self_instruct"]["round"]):
            raise ValueError(f"{where}: field 'self_instruct.id' / 'round' ({made.get('id')!r}, {made.get('round')!r}) "
                             "out of sequence; was the file edited? use another --output")
        records.append(record)
        ends.append((ends[-1] if ends else 0) + len(line))
    last_round = records[-1]["self_instruct"]["round"] if records else None
    kept = [e for r, e in zip(records, ends) if r["self_instruct"]["round"] != last_round]
    return records, kept[-1] if kept else 0


@contextmanager
def _quiet_length_warning():
    """Hide transformers' "Token indices sequence length is longer than the specified maximum"
    while prompts are tokenized: _check_inputs compares the length with the model's positions
    itself and says so in one line."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def sampler_completions(sampler) -> Complete:
    """`Complete` through a posttrain.sampling.Sampler."""
    def complete(prompts, params):
        gen = sampler.generate(prompts, params)
        return list(zip(gen.responses, gen.finish_reasons))
    return complete


def round_prompts(guidelines: str, seeds: list[Task], generated: list[Task], settings: GenerateSettings, seed: int,
                  round_index: int, tokenizer) -> tuple[list[TokenizedPrompt], list[list[Task]]]:
    """Round `round_index`'s prompts (chat-rendered, the assistant turn begun) and the tasks each shows."""
    from posttrain.data import TokenizedPrompt, tokenize_prompt

    # A string seed is hashed with SHA-512 by `random`: the same draw in every process.
    rng = random.Random(f"self-instruct/{seed}/{round_index}")
    prompts, shown = [], []
    for i in range(settings.prompts_per_round):
        tasks = draw_examples(seeds, generated, settings, rng)
        user, prefill = render_prompt(guidelines, tasks)
        messages = [{"role": "user", "content": user}]
        with _quiet_length_warning():
            ids = tokenize_prompt(messages, tokenizer) + tokenizer.encode(prefill, add_special_tokens=False)
        prompts.append(TokenizedPrompt(ids, messages, {}, round_index * settings.prompts_per_round + i))
        shown.append(tasks)
    return prompts, shown


def _check_inputs(model: str, guidelines: str, seeds: list[Task], params: SamplingParams, settings: GenerateSettings,
                  tokenizer) -> None:
    """ValueError if the seed tasks are too few, or a prompt of the longest seeds plus
    max_new_tokens passes the model's positions."""
    from transformers import AutoConfig

    from posttrain.data import tokenize_prompt
    from posttrain.models import resolve_model_path

    if len(seeds) < settings.examples:
        raise ValueError(f"--seed-tasks: {len(seeds)} seed tasks; --examples={settings.examples} needs at least "
                         "as many")
    positions = getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "max_position_embeddings", None)
    longest = sorted(seeds, key=lambda t: -len(t.instruction + t.input + t.output))[: settings.examples]
    user, prefill = render_prompt(guidelines, longest)
    with _quiet_length_warning():
        length = len(tokenize_prompt([{"role": "user", "content": user}], tokenizer)) \
            + len(tokenizer.encode(prefill, add_special_tokens=False))
    if positions is not None and length + params.max_new_tokens > positions:
        raise ValueError(f"--max-new-tokens={params.max_new_tokens}: a prompt showing the {settings.examples} longest "
                         f"seed tasks has {length} tokens, together more than the {positions} positions of {model}")


def generate_file(model: str, guidelines_path: str, seed_tasks_path: str, output: str, *, n: int,
                  params: SamplingParams, settings: GenerateSettings = GenerateSettings(), precision: str = "auto",
                  max_attempts: int | None = None,
                  complete: Complete | None = None) -> tuple[GenerateSummary, int | None]:
    """Append accepted tasks to the JSONL file `output` until it holds `n` (see the module docstring).

    Everything is validated before the model loads or `output` is touched. Stops early after
    `max_attempts` candidates over the file's rounds (default 20·n; the last round is cut to fit,
    see the module docstring), or between two rounds on SIGINT / SIGTERM.
    complete: the sampler to use instead of the model's (tests script it). Returns (the summary,
    the signal that stopped the run or None); the summary line is printed to stderr.
    Errors: ValueError / FileNotFoundError, one line, for a bad setting, guidelines file or seed
    task (file, record, field), or an existing `output` of other settings.
    """
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.models.precision import resolve_precision
    from posttrain.sampling import Sampler
    from posttrain.scoring.files import check_output

    if n < 1:
        raise ValueError(f"--n={n}: expected at least 1 record")
    max_attempts = 20 * n if max_attempts is None else max_attempts
    if max_attempts < 1:
        raise ValueError(f"--max-attempts={max_attempts}: expected at least 1")
    settings.validate()
    # The model is told where a task ends; it stops there instead of writing the next one.
    params = type(params)(**{**asdict(params), "n": settings.samples_per_prompt,
                             "stop_strings": (*params.stop_strings, f"\nTask {settings.examples + 2}")})
    params.validate()
    check_output(output, seed_tasks_path)
    out = Path(output)
    if out.resolve() == Path(guidelines_path).resolve():
        raise ValueError(f"--output {output} is the guidelines file itself")
    guidelines, seeds = read_guidelines(guidelines_path), read_seed_tasks(seed_tasks_path)
    tokenizer = load_tokenizer(model)
    _check_inputs(model, guidelines, seeds, params, settings, tokenizer)
    resolved = resolve_precision(precision)
    expected = run_provenance(model, guidelines, seeds, params, resolved, settings)
    records, keep_bytes = read_progress(out, expected) if out.exists() else ([], 0)
    summary = GenerateSummary(total=len(records))
    first_round = records[-1]["self_instruct"]["round"] if records else 0
    rounds = math.ceil(max_attempts / (settings.prompts_per_round * settings.samples_per_prompt))
    if len(records) >= n or first_round >= rounds:
        print(f"{output}: already holds {len(records)} records (--n={n}, --max-attempts={max_attempts}); "
              "nothing to do", file=sys.stderr)
        return summary, None
    if complete is None:
        complete = sampler_completions(Sampler(load_causal_lm(model), tokenizer, precision=resolved,
                                               batch_size=settings.prompts_per_round * settings.samples_per_prompt))
    kept = [r for r in records if r["self_instruct"]["round"] != first_round]
    if out.exists() and out.stat().st_size != keep_bytes:
        with out.open("r+b") as f:
            f.truncate(keep_bytes)
        print(f"{output}: continuing after {len(kept)} records; redoing round {first_round}, the last in the file",
              file=sys.stderr)
    generated = [Task(r["self_instruct"]["id"], r["instruction"], r["input"], r["output"]) for r in kept]
    signal_number = _rounds(complete, tokenizer, guidelines, seeds, generated, out, first_round, n=n,
                            max_attempts=max_attempts, params=params, settings=settings, expected=expected,
                            summary=summary)
    summary.total = len(generated)
    print(summary.line(output), file=sys.stderr)
    if signal_number is not None:
        print(f"posttrain data generate: stopped by signal {signal_number} with {len(generated)} of {n} records; "
              "re-run the same command to continue", file=sys.stderr)
    elif len(generated) < n:
        print(f"posttrain data generate: stopped at --max-attempts={max_attempts} with {len(generated)} of {n} "
              "records; re-run with a larger --max-attempts to continue (rounds after the last one that accepted "
              "a record are sampled again)", file=sys.stderr)
    return summary, signal_number


def _sample_round(complete: Complete, prompts: list[TokenizedPrompt], params: SamplingParams,
                  attempts: int) -> list[tuple[str, str]]:
    """The round's first `attempts` candidates in slot order (all prompts × params.n when it
    allows them): whole prompts, then the first samples of one more. Sample j of a prompt is
    the same whatever params.n is (the sampler seeds each sequence by prompt and sample index)."""
    whole, part = divmod(min(attempts, len(prompts) * params.n), params.n)
    results = complete(prompts[:whole], params) if whole else []
    if part:
        results += complete(prompts[whole: whole + 1], replace(params, n=part))
    expected = whole * params.n + part
    if len(results) != expected:
        raise ValueError(f"sampler: {len(results)} results for {expected} candidates asked")
    return results


def _rounds(complete: Complete, tokenizer, guidelines: str, seeds: list[Task], generated: list[Task], out: Path,
            first_round: int, *, n: int, max_attempts: int, params: SamplingParams, settings: GenerateSettings,
            expected: dict, summary: GenerateSummary) -> int | None:
    """The generation loop: rounds from first_round until `generated` holds n tasks or the
    rounds so far have sampled max_attempts candidates (counted from round 0; the last round is
    cut to fit); appends each round's accepted records in one write. Returns the signal that
    stopped it, or None."""
    from rouge_score.rouge_scorer import RougeScorer
    from tqdm import tqdm

    from posttrain.sampling.files import stop_on_signal

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    with stop_on_signal() as caught, out.open("a", encoding="utf-8") as f, \
            tqdm(total=n, initial=len(generated), desc="generate", unit="task", file=sys.stderr) as bar:
        per_round = settings.prompts_per_round * settings.samples_per_prompt
        for round_index in range(first_round, math.ceil(max_attempts / per_round)):
            if len(generated) >= n:
                break
            prompts, shown = round_prompts(guidelines, seeds, generated, settings, params.seed, round_index, tokenizer)
            results = _sample_round(complete, prompts, params, max_attempts - round_index * per_round)
            summary.sampled += len(results)
            lines = []
            for slot, (text, finish_reason) in enumerate(results):
                if len(generated) >= n:
                    summary.unused += len(results) - slot
                    break
                fields, why = check_candidate(text, finish_reason, settings)
                if why is None:
                    score, similar = most_similar(fields[0], seeds + generated, scorer)
                    why = "near-duplicate" if score >= settings.rouge_threshold else None
                if why is not None:
                    summary.dropped[why] += 1
                    continue
                task = Task(f"gen-{len(generated)}", *fields)
                generated.append(task)
                provenance = {"id": task.id, "round": round_index, "slot": slot,
                              "shown": [t.id for t in shown[slot // settings.samples_per_prompt]],
                              "rouge_l": round(score, 4), "most_similar": similar, **expected}
                lines.append(json.dumps({"instruction": task.instruction, "input": task.input, "output": task.output,
                                         "self_instruct": provenance}, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            summary.accepted += len(lines)
            summary.seconds = time.perf_counter() - start
            bar.update(len(lines))
            if caught:
                return caught[0]
    return None


def add_parser(data_sub: argparse._SubParsersAction, name: str) -> None:
    """`posttrain data generate`'s flags."""
    from posttrain.cli import OneDefaultHelpFormatter, add_sampling_flags

    p = data_sub.add_parser(name, help="Instruction records written by a model from guidelines and seed tasks "
                            "(self-instruct), filtered and appended to a JSONL file.",
                            formatter_class=OneDefaultHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF id or folder")
    p.add_argument("--guidelines", required=True, help="text file of annotation guidelines shown in every prompt")
    p.add_argument("--seed-tasks", required=True, help="records {instruction, input?, output, id?} that start the pool")
    p.add_argument("--n", type=int, required=True, help="records the output file should hold")
    p.add_argument("--output", required=True,
                   help="JSONL of {instruction, input, output} records; one of the same settings is continued")
    defaults = GenerateSettings()
    p.add_argument("--examples", type=int, default=defaults.examples, help="tasks shown in each prompt")
    p.add_argument("--generated-examples", type=int, default=defaults.generated_examples,
                   help="how many of them are drawn from the generated tasks, once there are some")
    p.add_argument("--prompts-per-round", type=int, default=defaults.prompts_per_round,
                   help="prompts per round, each with its own draw of tasks")
    p.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt,
                   help="candidates sampled from each prompt (a round samples prompts × this together)")
    p.add_argument("--rouge-threshold", type=float, default=defaults.rouge_threshold,
                   help="drop a candidate whose ROUGE-L with a pool instruction is at least this")
    p.add_argument("--blocklist", default=None, metavar="FILE",
                   help="words or phrases (one a line) an instruction must not contain (default: " +
                   ", ".join(BLOCKLIST) + ")")
    p.add_argument("--min-instruction-words", type=int, default=defaults.min_instruction_words,
                   help="drop shorter instructions")
    p.add_argument("--max-instruction-words", type=int, default=defaults.max_instruction_words,
                   help="drop longer instructions")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="stop after this many candidates, counted over the file's rounds (the last round is cut "
                        "to fit; a re-run samples again the rounds after the last that accepted a record) "
                        "(default: 20 × --n)")
    add_sampling_flags(p, temperature=0.7)
    p.set_defaults(max_new_tokens=256, top_p=0.9)


def run(args: argparse.Namespace) -> int:
    """Run `posttrain data generate`: 0 when the file holds --n records, 128 + the signal when
    one stopped it, 1 when --max-attempts ran out first."""
    from posttrain.cli import sampling_params

    if args.blocklist and Path(args.output).resolve() == Path(args.blocklist).resolve():
        raise ValueError(f"--output {args.output} is the --blocklist file itself")
    settings = GenerateSettings(
        examples=args.examples, generated_examples=args.generated_examples,
        prompts_per_round=args.prompts_per_round, samples_per_prompt=args.samples_per_prompt,
        rouge_threshold=args.rouge_threshold, min_instruction_words=args.min_instruction_words,
        max_instruction_words=args.max_instruction_words,
        blocklist=read_blocklist(args.blocklist) if args.blocklist else BLOCKLIST)
    summary, signal_number = generate_file(args.model, args.guidelines, args.seed_tasks, args.output, n=args.n,
                                           params=sampling_params(args), settings=settings, precision=args.precision,
                                           max_attempts=args.max_attempts)
    if signal_number is not None:
        return 128 + signal_number
    return 0 if summary.total >= args.n else 1
