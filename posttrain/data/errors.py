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
    """Where `text` hides a character no one sees or types on purpose, as "U+200B (ZERO WIDTH SPACE)
    at position 8" (1-based); None when it has none. Such are control characters (Unicode Cc, tab
    and newline too), invisible format characters (Cf), line and paragraph separators (Zl, Zp) and
    the surrogates Python decodes a byte that is not UTF-8 to (Cs: a path with one cannot be written
    by every library). A joiner (ZWJ U+200D, ZWNJ U+200C) between two visible characters is part of
    a word or an emoji, as in Persian names, and passes. A path pasted with a hidden character names
    a file no one can find again: "s.jsonl\u200b" is not s.jsonl."""
    def visible(i: int) -> bool:
        return 0 <= i < len(text) and not text[i].isspace() and unicodedata.category(text[i]) not in HIDDEN

    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if category not in HIDDEN or char in JOINERS and visible(i - 1) and visible(i + 1):
            continue
        if category == "Cs":
            name = f"the byte 0x{ord(char) - 0xDC00:02X}, not UTF-8" if 0xDC80 <= ord(char) <= 0xDCFF else "a surrogate"
        else:
            name = unicodedata.name(char, "control character")
        return f"U+{ord(char):04X} ({name}) at position {i + 1}"
    return None


HIDDEN = ("Cc", "Cf", "Cs", "Zl", "Zp")
JOINERS = ("\u200c", "\u200d")


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
