"""What `posttrain eval` writes and `posttrain report` reads, kept apart from both so the report
can be rendered without importing the eval run's model code."""

import os
from pathlib import Path

FORMAT = "posttrain-eval/1"
"""eval.json's "format"; `posttrain report` refuses a file of another."""

SHOWCASE_PROMPT = "Explain the moon landing to a 6 year old in a few sentences."
"""The notes' example prompt: every evaluated model answers it too, and the report opens with the answers."""


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder renamed into place, so a
    reader never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
