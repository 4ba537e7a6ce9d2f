"""Load a data source into tokenized training examples, validating every record first.

Each loader reads all records, validates all of them, and only then tokenizes, so a run never
starts on a file that turns out half-valid. Without skip_invalid the first bad record raises
its RecordError; with it, bad records are dropped and counted by reason in the LoadReport.
File-level problems (DataError) and tokenizer/template problems (ValueError) always raise.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from posttrain.data.errors import DataError, RecordError
from posttrain.data.formats import (LabelledCompletion, PreferencePair, labelled_completions, preference_pairs,
                                     prompt_messages, sft_messages)
from posttrain.data.records import BadLine, read_records
from posttrain.data.tokenize import (
    TokenizedCompletion,
    TokenizedExample,
    TokenizedPair,
    tokenize_completion,
    tokenize_conversation,
    tokenize_pair,
    tokenize_prompt,
)

OVERLONG = ("truncate", "drop")


@dataclass
class LoadReport:
    """What a loader did with a source: how many records it read and returned, and why it
    left any out. `unit` names what was returned ("records", "pairs", "prompts")."""

    source: str
    unit: str
    max_length: int
    records: int = 0
    """Records read from the source."""
    loaded: int = 0
    """Examples returned (pairs for preference data: a scored record can give several)."""
    invalid: Counter = field(default_factory=Counter)
    """Invalid records skipped (skip_invalid=True), by RecordError.reason."""
    truncated: int = 0
    """Returned examples cut to max_length."""
    dropped: Counter = field(default_factory=Counter)
    """Valid records or pairs left out, by reason (too long, no loss token after truncation, ...)."""

    def summary(self) -> str:
        """One line, e.g. "loaded 98 records from f.jsonl; skipped 3 invalid (empty completion:
        2, missing field 'completion': 1); truncated 3 longer than 512 tokens"."""
        parts = [f"loaded {self.loaded} {self.unit} from {self.source}"]
        if self.unit != "records":
            parts[0] += f" ({self.records} records)"
        if self.invalid:
            parts.append(f"skipped {sum(self.invalid.values())} invalid ({_counts(self.invalid)})")
        if self.truncated:
            parts.append(f"truncated {self.truncated} longer than {self.max_length} tokens")
        if self.dropped:
            parts.append(f"dropped {sum(self.dropped.values())} ({_counts(self.dropped)})")
        return "; ".join(parts)


def _counts(counter: Counter) -> str:
    """"empty completion: 2, missing field 'completion': 1": a reason names one case, so a
    count written after it reads right for any number."""
    return ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())


def _check_options(max_length: int, overlong: str) -> None:
    if max_length < 2:
        raise ValueError(f"max_length: expected at least 2 tokens, got {max_length}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong: expected one of {list(OVERLONG)}, got {overlong!r}")


def _validate_all(
    source: str | os.PathLike, report: LoadReport, skip_invalid: bool, parse: Callable[[Any, int], Any]
) -> list[tuple[int, dict, Any]]:
    """(index, record, parse(record, index)) for every valid record; RecordError or count.
    With skip_invalid a JSONL line that holds no record is counted too (BadLine)."""
    records = read_records(source, bad_lines=skip_invalid)
    report.records = len(records)
    valid = []
    for index, record in enumerate(records):
        if isinstance(record, BadLine):
            report.invalid[record.reason] += 1
            continue
        try:
            valid.append((index, record, parse(record, index)))
        except RecordError as error:
            if not skip_invalid:
                raise
            report.invalid[error.reason] += 1
    if not valid:
        raise DataError(f"{report.source}: no valid records; skipped {report.records} invalid "
                        f"({_counts(report.invalid)})")
    return valid


def _nothing_left(report: LoadReport) -> DataError:
    return DataError(f"{report.source}: no {report.unit} left after length limits ({report.summary()})")


def load_sft_examples(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedExample], LoadReport]:
    """SFT examples of every valid record of `source`, in file order, and the LoadReport.

    An example longer than max_length tokens is cut to its first max_length tokens
    (overlong="truncate") or left out ("drop"); a truncated example with no loss token left
    is left out too. Raises DataError if nothing is left.
    """
    _check_options(max_length, overlong)
    report = LoadReport(str(source), "records", max_length)
    valid = _validate_all(source, report, skip_invalid,
                          lambda record, index: sft_messages(record, source=str(source), index=index))
    examples = []
    for _, _, messages in valid:
        example = tokenize_conversation(messages, tokenizer, train_on_prompt=train_on_prompt)
        if len(example.input_ids) > max_length:
            if overlong == "drop":
                report.dropped[f"longer than {max_length} tokens"] += 1
                continue
            example = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length])
            if not any(example.loss_mask):
                report.dropped[f"no loss token in the first {max_length} tokens"] += 1
                continue
            report.truncated += 1
        examples.append(example)
    report.loaded = len(examples)
    if not examples:
        raise _nothing_left(report)
    return examples, report


def load_preference_pairs(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    pairing: str = "all",
    min_score_gap: float = 0.0,
    overlong: str = "truncate",
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPair], LoadReport]:
    """Tokenized preference pairs of every valid record of `source`, and the LoadReport.

    Scored records expand as in `preference_pairs`; one whose score gaps are all
    <= min_score_gap gives no pair and is counted under dropped. An overlong pair is
    truncated as `tokenize_pair` describes, or left out (overlong="drop"); a pair whose
    replies tokenise identically, whole or truncated, is left out, as it carries no preference.
    """
    _check_options(max_length, overlong)
    report = LoadReport(str(source), "pairs", max_length)

    def parse(record: Any, index: int) -> list[PreferencePair]:
        return preference_pairs(record, source=str(source), index=index, pairing=pairing, min_score_gap=min_score_gap)

    tokenized = []
    for _, _, pairs in _validate_all(source, report, skip_invalid, parse):
        if not pairs:
            report.dropped[f"no pair with a score gap > {min_score_gap:g}"] += 1
        for pair in pairs:
            full = tokenize_pair(pair, tokenizer)
            if full.chosen_ids == full.rejected_ids:
                # Different text, same tokens (a template that trims, a tokenizer that
                # normalises): the pair's loss is a constant and teaches nothing.
                report.dropped["chosen and rejected tokenise identically"] += 1
            elif full.length <= max_length:
                tokenized.append(full)
            elif overlong == "drop":
                report.dropped[f"longer than {max_length} tokens"] += 1
            else:
                cut = tokenize_pair(pair, tokenizer, max_length=max_length)
                if cut.chosen_ids == cut.rejected_ids:
                    report.dropped[f"identical in the first {max_length} tokens"] += 1
                    continue
                report.truncated += 1
                tokenized.append(cut)
    report.loaded = len(tokenized)
    if not tokenized:
        raise _nothing_left(report)
    return tokenized, report


def load_labelled_completions(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    pairing: str = "all",
    min_score_gap: float = 0.0,
    overlong: str = "truncate",
    skip_invalid: bool = False,
) -> tuple[list[TokenizedCompletion], LoadReport]:
    """Tokenized labelled completions (KTO's examples) of every valid record of `source`, in
    file order, and the LoadReport.

    A `{prompt, completion, label}` record gives one example, a preference record two per pair
    (see `labelled_completions`); a scored record with no pair is counted under dropped. An
    overlong example is truncated as `tokenize_completion` describes, or left out
    (overlong="drop").
    """
    _check_options(max_length, overlong)
    report = LoadReport(str(source), "examples", max_length)

    def parse(record: Any, index: int) -> list[LabelledCompletion]:
        return labelled_completions(record, source=str(source), index=index, pairing=pairing,
                                    min_score_gap=min_score_gap)

    tokenized = []
    for _, _, examples in _validate_all(source, report, skip_invalid, parse):
        if not examples:
            report.dropped[f"no pair with a score gap > {min_score_gap:g}"] += 1
        for example in examples:
            full = tokenize_completion(example, tokenizer)
            if full.length <= max_length:
                tokenized.append(full)
            elif overlong == "drop":
                report.dropped[f"longer than {max_length} tokens"] += 1
            else:
                report.truncated += 1
                tokenized.append(tokenize_completion(example, tokenizer, max_length=max_length))
    report.loaded = len(tokenized)
    if not tokenized:
        raise _nothing_left(report)
    return tokenized, report


@dataclass
class TokenizedPrompt:
    """A prompt for generation. input_ids: [P], ending with the generation prompt.
    messages: the prompt conversation. record: the source record as read (reward functions
    may need its other fields, e.g. a reference answer). source_index: 0-based position."""

    input_ids: list[int]
    messages: list[dict[str, str]]
    record: dict[str, Any]
    source_index: int


def load_prompts(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPrompt], LoadReport]:
    """Tokenized prompts of every valid prompt record of `source`, and the LoadReport.

    A prompt longer than max_prompt_length tokens is left out and counted: cutting it would
    remove either the question or the generation prompt the model answers after.
    """
    _check_options(max_prompt_length, "drop")
    report = LoadReport(str(source), "prompts", max_prompt_length)
    valid = _validate_all(source, report, skip_invalid,
                          lambda record, index: prompt_messages(record, source=str(source), index=index))
    prompts = []
    for index, record, messages in valid:
        ids = tokenize_prompt(messages, tokenizer)
        if len(ids) > max_prompt_length:
            report.dropped[f"longer than {max_prompt_length} tokens"] += 1
            continue
        prompts.append(TokenizedPrompt(ids, messages, record, index))
    report.loaded = len(prompts)
    if not prompts:
        raise _nothing_left(report)
    return prompts, report
