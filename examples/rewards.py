"""Verifiable rewards for examples/data/arithmetic*.jsonl, as `fn:` judge specs (run from the
repository root, whose folder `fn:` specs import from):

    posttrain judge --data samples.jsonl --judge fn:examples.rewards:exact_match --keep-all --output scored.jsonl
    posttrain grpo --data examples/data/arithmetic.jsonl \
        --judges fn:examples.rewards:exact_match,fn:examples.rewards:format_reward --judge-weights 1,0.2 …

Each function takes the prompts and replies (and, for exact_match, the prompt records that hold
the reference "answer") and returns one float per reply.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"([-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+))(?:\.(\d+))?")
"""A number: optional sign (ASCII hyphen or Unicode minus), digits or thousands groups, decimals."""


def last_integer(text: str) -> int | None:
    """The last number written in `text` as an integer ("-1,234" → -1234, "7.0" → 7), or None
    if there is none or it has a fraction ("7.5": not the integer 7). The last, because a reply
    that works the sum out ("37 + 58 = 95") states its answer at the end, as GSM8K-style graders
    read final answers."""
    matches = list(NUMBER.finditer(text))
    if not matches or (matches[-1].group(2) or "0").strip("0"):
        return None
    return int(matches[-1].group(1).replace(",", "").replace("−", "-"))


def exact_match(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    """1.0 where the reply's last integer equals the record's "answer", else 0.0."""
    scores = []
    for response, record in zip(responses, records):
        if "answer" not in record:
            raise ValueError(f"a prompt record has no 'answer' field (fields {sorted(record)})")
        scores.append(float(last_integer(response) == int(record["answer"])))
    return scores


def format_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the reply is a bare integer (what the prompts ask for), else 0.0."""
    return [float(re.fullmatch(r"[-−]?\d+", response.strip()) is not None) for response in responses]
