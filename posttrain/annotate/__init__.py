"""Human preference annotation: a small web app that turns sampled replies into preference data.

items.py (data file → items) → storage.py (SQLite: items, annotators, assignments, labels)
→ app.py (the Flask app, assets/ its page) → results.py (agreement, status, majority-vote
export) ← commands.py (`posttrain annotate serve | add-annotator | status | export`).

Imported only by its command, so the trainers never load Flask.
"""

MODES = ("pair", "single")
"""pair: two replies, A / B / tie / both bad. single: one reply, good / bad (KTO's feedback).
Here, not in items.py, so the CLI can list them without importing the data layer."""
