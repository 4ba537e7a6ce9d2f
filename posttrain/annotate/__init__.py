"""Human preference annotation: a small web app that turns sampled replies into preference data.

items.py (data file → items) → storage.py (SQLite: items, annotators, assignments, labels)
→ app.py (the Flask app, assets/ its page) → results.py (agreement, status, majority-vote
export) ← commands.py (`posttrain annotate serve | add-annotator | status | export`).

Imported only by its command, so the trainers never load Flask.
"""

MODES = ("pair", "single")
"""pair: two replies, A / B / tie / both bad. single: one reply, good / bad (KTO's feedback).
Here, not in items.py, so the CLI can list them without importing the data layer."""


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """"1 item", "2 items": `n` and `noun`, or `nouns` (default noun + "s") when n ≠ 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"
