"""Items to annotate, formed from the records of a data file.

An item is what one judgement is about: a prompt and two replies (mode "pair": which is
better?) or one reply (mode "single": good or bad?). Per input record:

* a samples record `{prompt | messages, responses, finish_reasons?}`, as `posttrain sample`
  writes it (a scored list `{prompt, responses, scores}` reads the same; its scores are not
  shown): in pair mode, pairs of its usable responses — every pair, or with `pairs_per_prompt`
  M > 0 a subset of M drawn by a generator seeded from the prompt's text, so that loading the
  file again draws the same pairs; in single mode, each usable response. A response is usable
  when it is not empty or whitespace-only (what a model that emitted EOS at once writes;
  neither `posttrain rm` nor `posttrain kto` accepts an empty reply) and not an exact repeat
  of an earlier response to the same prompt (two identical texts hold no preference). A
  prompt left with fewer than 2 (pair) or 1 (single) usable responses is skipped and counted.
* a preference record `{prompt, chosen, rejected}` (either shape `preference_pairs` reads):
  in pair mode the pair itself, to verify — the item remembers which reply the file chose,
  and `posttrain annotate status` says how often the annotators' majority agrees; in single
  mode its chosen and its rejected reply, as two items.
* `{prompt, completion}` (single mode only): the completion.

A file holds one of these record kinds; a file mixing them is refused (a record's "messages",
when present, must be a conversation, not a string).

An item is identified by a hash of its prompt and replies (the replies' order ignored), so
loading a file twice, or two files that share a pair, adds each item once.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from posttrain.annotate import MODES, plural
from posttrain.data import RecordError, preference_pairs, sampled_responses, sft_messages
from posttrain.data.errors import short_repr

KIND_NAMES = {"samples": "samples {prompt | messages, responses}", "pair": "preference {prompt, chosen, rejected}",
              "completion": "{prompt, completion}"}
RECORD_HELP = "{prompt | messages, responses} | {prompt, chosen, rejected} | {prompt, completion} (single mode)"


@dataclass(frozen=True)
class Item:
    """One thing to judge. prompt: conversation ending in a user turn. replies: 2 (pair mode)
    or 1 (single mode) replies, each a list of assistant messages; in a pair taken from a
    preference record, replies[0] is the record's chosen one. source: where it came from
    (file, 0-based record, response indices or the record's preference), kept for export."""

    prompt: list[dict[str, str]]
    replies: tuple[list[dict[str, str]], ...]
    source: dict[str, Any]

    @property
    def key(self) -> str:
        """sha256 of the prompt and the replies, the replies' order ignored."""
        replies = sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in self.replies)
        text = json.dumps({"prompt": self.prompt, "replies": replies}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class LoadSummary:
    """What forming items from a file found, for the load line `serve` prints."""

    records: int = 0
    items: int = 0
    added: int = 0
    """Items new to the database (set by the caller once they are stored)."""
    skipped_prompts: Counter = field(default_factory=Counter)
    """Prompts that gave no item, by reason."""
    left_out_responses: Counter = field(default_factory=Counter)
    """Responses that were not used, by reason ("empty", "repeated")."""

    def line(self, source: str) -> str:
        parts = [f"{source}: read {plural(self.records, 'record')}, formed {plural(self.items, 'item')} "
                 f"({self.added} new, {self.items - self.added} already loaded)"]
        if self.skipped_prompts:
            parts.append(f"skipped {plural(sum(self.skipped_prompts.values()), 'prompt')} ("
                         + ", ".join(f"{n} {why}" for why, n in self.skipped_prompts.most_common()) + ")")
        if self.left_out_responses:
            parts.append("left out " + ", ".join(plural(n, f"{why} response")
                                                 for why, n in self.left_out_responses.most_common()))
        return "; ".join(parts)


def usable_responses(responses: list[str]) -> tuple[list[int], Counter]:
    """Indices of the responses worth judging (non-blank, first of identical texts), and the
    others counted by reason."""
    kept, seen, left_out = [], set(), Counter()
    for i, text in enumerate(responses):
        if not text.strip():
            left_out["empty"] += 1
        elif text in seen:
            left_out["repeated"] += 1
        else:
            kept.append(i)
            seen.add(text)
    return kept, left_out


def choose_pairs(indices: list[int], pairs_per_prompt: int, seed_text: str) -> list[tuple[int, int]]:
    """Every pair (i < j) of `indices` in order, or, when 0 < pairs_per_prompt < their number,
    that many of them drawn by a generator seeded from `seed_text` (the same text always draws
    the same pairs, which keeps loading idempotent), in order."""
    every = [(a, b) for n, a in enumerate(indices) for b in indices[n + 1:]]
    if pairs_per_prompt <= 0 or pairs_per_prompt >= len(every):
        return every
    seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8")).digest()[:8], "big")
    return sorted(random.Random(seed).sample(every, pairs_per_prompt))


def _kind(record: Any, source: str, index: int, mode: str) -> str:
    present = {k for k in ("responses", "chosen", "rejected", "completion")
               if isinstance(record, dict) and record.get(k) is not None}
    if "responses" in present and present & {"chosen", "rejected", "completion"}:
        other = sorted(present - {"responses"})[0]
        raise RecordError(source, index + 1, other, f"expected the fields of one record shape ({RECORD_HELP}), got "
                          f"'responses' together with '{other}'", reason="ambiguous record shape")
    if "responses" in present:
        return "samples"
    if present & {"chosen", "rejected"}:
        return "pair"
    if "completion" in present and mode == "single":
        return "completion"
    fields = sorted(k for k in record if record[k] is not None) if isinstance(record, dict) else []
    hint = " ({prompt, completion} records need --mode single)" if "completion" in present else ""
    raise RecordError(source, index + 1, "responses", f"expected the fields of one record shape ({RECORD_HELP}), "
                      f"got fields {fields}{hint}", reason="unknown record shape")


def items_from_records(records: list[dict], *, source: str, mode: str,
                       pairs_per_prompt: int = 0) -> tuple[list[Item], LoadSummary]:
    """The items the records hold (module docstring), in record order, and the summary.
    Raises RecordError (one line: file, record, field, value) on the first invalid record, and
    ValueError for a bad option."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected one of {list(MODES)}")
    if pairs_per_prompt < 0:
        raise ValueError(f"--pairs-per-prompt {pairs_per_prompt}: expected ≥ 0 (0: every pair)")
    items, summary = [], LoadSummary(records=len(records))
    first_kind = None
    for index, record in enumerate(records):
        kind = _kind(record, source, index, mode)
        first_kind = first_kind or kind
        if kind != first_kind:
            # Replies to compare and pairs to verify are different tasks (status counts agreement
            # with a file's preferences), so one file, and one load, holds one of them.
            field_name = next(k for k in ("responses", "chosen", "rejected", "completion") if record.get(k) is not None)
            raise RecordError(source, index + 1, field_name, f"a {KIND_NAMES[kind]} record, but record 1 is a "
                              f"{KIND_NAMES[first_kind]} record; put each kind in a file of its own",
                              reason="mixed record shapes")
        if isinstance(record.get("messages"), str):
            # The data layer reads a string prompt as one user turn; "messages" names a
            # conversation, so a string there is a wrong field, not a prompt.
            raise RecordError(source, index + 1, "messages", "expected a list of {role, content} messages, got "
                              f"string {short_repr(record['messages'])} (a text prompt goes in 'prompt')",
                              reason="non-list messages")
        where = {"file": source, "record": index}
        if kind == "samples":
            sample = sampled_responses(record, source=source, index=index, min_responses=0)
            kept, left_out = usable_responses(sample.responses)
            summary.left_out_responses.update(left_out)
            need = 2 if mode == "pair" else 1
            if len(kept) < need:
                summary.skipped_prompts[f"with fewer than {need} usable responses"] += 1
                continue
            reply = [[{"role": "assistant", "content": sample.responses[i]}] for i in range(len(sample.responses))]
            if mode == "pair":
                seed_text = json.dumps(sample.prompt, sort_keys=True, ensure_ascii=False)
                items += [Item(sample.prompt, (reply[i], reply[j]), {**where, "responses": [i, j]})
                          for i, j in choose_pairs(kept, pairs_per_prompt, seed_text)]
            else:
                items += [Item(sample.prompt, (reply[i],), {**where, "responses": [i]}) for i in kept]
        elif kind == "pair":
            (pair,) = preference_pairs(record, source=source, index=index)
            if mode == "pair":
                items.append(Item(pair.prompt, (pair.chosen, pair.rejected), {**where, "given": "first"}))
            else:
                items += [Item(pair.prompt, (pair.chosen,), {**where, "given": "chosen"}),
                          Item(pair.prompt, (pair.rejected,), {**where, "given": "rejected"})]
        else:
            messages = sft_messages({"prompt": record.get("prompt"), "completion": record["completion"]},
                                    source=source, index=index)
            split = max(i for i, m in enumerate(messages) if m["role"] == "user") + 1
            items.append(Item(messages[:split], (messages[split:],), where))
    summary.items = len(items)
    return items, summary
