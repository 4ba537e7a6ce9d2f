"""Errors for bad training data: one line each, naming the file, the record, the field and the value.

Two kinds:

* `DataError` — the source as a whole is unusable (missing file, invalid JSON, no records,
  no valid records). Never skipped.
* `RecordError(DataError)` — one record is bad. Loaders raise it, or with `skip_invalid=True`
  drop the record and count it under `error.reason` (a short label such as
  "missing field 'completion'" or "empty completion") in their `LoadReport`.
"""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_VALUE_CHARS = 60


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only whitespace and invisible format characters (Unicode
    category Cf: zero-width space U+200B, joiners, a byte-order mark U+FEFF), which str.strip()
    keeps, so "\u200b" would otherwise pass for a message."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def invisible_character(text: str) -> str | None:
    """Where `text` hides a character no one sees or types on purpose — a control character
    (Unicode Cc, tab and newline too) or an invisible format character (Cf) — as "U+200B (ZERO
    WIDTH SPACE) at position 8" (1-based); None when it has none. A path pasted with one names a
    file no one can find again: "s.jsonl\u200b" is not s.jsonl."""
    for position, char in enumerate(text, start=1):
        if unicodedata.category(char) in ("Cc", "Cf"):
            name = unicodedata.name(char, "control character")
            return f"U+{ord(char):04X} ({name}) at position {position}"
    return None


class DataError(ValueError):
    """The data source `file` cannot be used; the message is one line starting with the file."""


class RecordError(DataError):
    """Record `record` (1-based) of `file` is invalid in `field`.

    The message reads "{file}: record {n}: field '{field}': {problem}"; `reason` is the short
    label loaders count skipped records by.
    """

    def __init__(self, file: str, record: int, field: str, problem: str, *, reason: str):
        super().__init__(f"{file}: record {record}: field '{field}': {problem}")
        self.file = file
        self.record = record
        self.field = field
        self.reason = reason


def short_repr(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """repr(value) cut to about `limit` characters, so a 10 kB completion stays a one-line message."""
    text = repr(value).replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    """JSON-flavoured name of value's type, for messages ("string", "list", "null", ...)."""
    names = {str: "string", list: "list", dict: "object", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)
