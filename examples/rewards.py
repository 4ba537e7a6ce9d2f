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


# ---------------------------------------------------------------- the quickstart's training judge

WORD = re.compile(r"[A-Za-z']+")
SENTENCE_END = (".", "!", "?", '."', '!"', '?"')


def child_friendly(prompts: list[str], responses: list[str]) -> list[float]:
    """What the quickstart's sampled preference data rewards: a short, simple, finished
    explanation, the style the notes ask of "Explain … to a 6 year old in a few sentences".

    Per reply: +1 if it ends a sentence (a reply cut off at the token limit does not), −1 if
    not; minus 4 × the share of words longer than 7 letters (jargon); minus 0.05 per word by
    which the mean sentence exceeds 12 words; minus 0.02 per word over 70 in all. A reply of
    fewer than 8 words scores −3: it explains nothing. Only surface features, on purpose —
    the quickstart evaluates with a different judge (examples/judges.py) that took no part.
    """
    scores = []
    for reply in responses:
        words = WORD.findall(reply)
        if len(words) < 8:
            scores.append(-3.0)
            continue
        finished = reply.rstrip().endswith(SENTENCE_END)
        sentences = max(1, len(re.findall(r"[.!?]+", reply)))
        long_share = sum(len(w) > 7 for w in words) / len(words)
        scores.append((1.0 if finished else -1.0) - 4.0 * long_share
                      - 0.05 * max(0.0, len(words) / sentences - 12) - 0.02 * max(0, len(words) - 70))
    return scores
