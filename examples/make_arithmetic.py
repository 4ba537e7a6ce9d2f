"""Writes examples/data/arithmetic.jsonl (200 prompts) and arithmetic_eval.jsonl (50): questions
on +, - and × of 1- and 2-digit numbers with exact integer answers, for a verifiable reward
(examples/rewards.py). Deterministic: running it again writes the same files.

    python examples/make_arithmetic.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
TRAIN, EVAL, SEED = 200, 50, 0


def operand(rng: random.Random) -> int:
    """1 or 2 digits with equal chance, so one-digit numbers are not a rare tenth of the draws."""
    return rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def questions(count: int, seed: int) -> list[dict]:
    """`count` distinct questions, the operations in turn."""
    rng, seen, out = random.Random(seed), set(), []
    symbols = list(OPERATIONS)
    while len(out) < count:
        a, b, op = operand(rng), operand(rng), symbols[len(out) % len(symbols)]
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append({"prompt": f"What is {a} {op} {b}? Answer with the number only.",
                    "answer": str(OPERATIONS[op](a, b))})
    return out


def main() -> None:
    records = questions(TRAIN + EVAL, SEED)
    random.Random(SEED).shuffle(records)   # the split mixes the operations
    folder = Path(__file__).resolve().parent / "data"
    for name, part in (("arithmetic.jsonl", records[:TRAIN]), ("arithmetic_eval.jsonl", records[TRAIN:])):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        print(f"wrote {len(part)} questions to {folder / name}")


if __name__ == "__main__":
    main()
