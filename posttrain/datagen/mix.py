"""`posttrain data mix`: a task mixture of N records drawn from several sources, seeded.

How much each source gives (Raffel et al. 2020, T5, §3.5 on multi-task mixing; the Flan
Collection, Longpre et al. 2023, mixes its task collections the same way):

* weights given (`A.jsonl:0.5 B.jsonl:0.3`): source i gets N·wᵢ/Σw records;
* no weights (`A.jsonl B.jsonl`): examples-proportional mixing with a cap K — wᵢ = min(sizeᵢ, K),
  so a huge source cannot drown the small ones (T5's "artificial dataset size limit");
* `cap_per_source` K also bounds what any source gives: a source whose share exceeds K gives K,
  and what is left over goes to the others by their weights (repeatedly, until nothing exceeds
  K). N larger than what the caps allow is an error.

Shares are made whole numbers by largest remainder (they sum to N exactly). A source gives its
share without repeats when it has enough records, otherwise whole passes over it plus a draw
for the rest (no record repeats more than once more than another). The mixture is shuffled.

Each output record is the source record plus `"mix": {"source", "index"}` (its file and 0-based
position there; a record that already had a "mix" object, from an earlier mix, gets the new one).
Every source record must be one `posttrain sft` reads (`posttrain.data.sft_messages`: prompt /
completion, Alpaca or messages), so a mixture that would fail in training fails here, naming
the file and record; `any_shape` mixes records of any shape. An existing output file is replaced,
atomically, once the mixture is drawn.

The mixture is built in memory, so N is bounded: at most MAX_RECORDS, and at most
MAX_PASSES times the records of all sources together.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

MAX_RECORDS = 10_000_000
"""Largest --n: ten million records held in memory is already several GB."""
MAX_PASSES = 100
"""Largest --n relative to the sources: more than 100 passes over them is a typo, not a mixture."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class MixSource:
    """One `PATH[:WEIGHT]` argument; weight None when not given."""

    path: str
    weight: float | None


def parse_source(text: str) -> MixSource:
    """`"A.jsonl:0.5"` → MixSource("A.jsonl", 0.5); `"A.jsonl"`, an existing file whose name has
    a colon, or a hub id with a split (`"org/name:test"`, whose suffix is no number) → weight None.
    ValueError for a weight that is no number after a local path (`A.jsonl:abc`) or not > 0."""
    from posttrain.data.errors import is_blank
    from posttrain.data.records import FILE_SUFFIXES

    path, sep, tail = text.rpartition(":")
    if sep and not Path(text).exists():
        try:
            weight = float(tail)
        except ValueError:
            if Path(path).exists() or Path(path).suffix.lower() in FILE_SUFFIXES:
                raise ValueError(f"{text}: weight {tail!r} is not a number") from None
            return MixSource(text, None)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{text}: weight {tail!r}: expected a finite number > 0")
        if is_blank(path):
            raise ValueError(f"{text!r}: no source before the weight")
        return MixSource(path, weight)
    return MixSource(text, None)


def whole_shares(n: int, weights: list[float]) -> list[int]:
    """n split in proportion to `weights` (all > 0) into whole numbers summing to n, by largest
    remainder (ties to the earlier source)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    return shares


def mixture_counts(n: int, weights: list[float], cap: int | None = None) -> list[int]:
    """Records each source gives: `whole_shares` of n, with every share ≤ cap — a capped source's
    surplus goes to the uncapped ones by their weights, until none exceeds the cap.

    ValueError if n < 1, or n > cap · len(weights) (the caps cannot hold n)."""
    if n < 1:
        raise ValueError(f"--n {n}: expected at least 1 record")
    if cap is None:
        return whole_shares(n, weights)
    if cap < 1:
        raise ValueError(f"--cap-per-source {cap}: expected at least 1")
    if n > cap * len(weights):
        raise ValueError(f"--n {n} is more than {len(weights)} sources capped at {cap} can give")
    counts, open_ = [0] * len(weights), list(range(len(weights)))
    left = n
    while True:
        shares = whole_shares(left, [weights[i] for i in open_])
        over = [i for i, s in zip(open_, shares) if s > cap]
        if not over:
            for i, s in zip(open_, shares):
                counts[i] = s
            return counts
        for i in over:
            counts[i] = cap
        left -= cap * len(over)
        open_ = [i for i in open_ if i not in over]


def draw(size: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into a source of `size` records: whole shuffled passes, then a sample
    without repeats for the rest."""
    passes, rest = divmod(count, size)
    indices = []
    for _ in range(passes):
        indices += rng.sample(range(size), size)
    return indices + rng.sample(range(size), rest)


def mix_records(sources: list[tuple[str, list[dict]]], n: int, *, weights: list[float] | None = None,
                cap: int | None = None, seed: int = 0) -> tuple[list[dict], list[int]]:
    """(the shuffled mixture of n records, the count drawn from each source).

    `sources` are (name, records) pairs; `weights` None means examples-proportional with the cap
    (see the module docstring)."""
    sizes = [len(records) for _, records in sources]
    if weights is None:
        weights = [min(size, cap) if cap else size for size in sizes]
    counts = mixture_counts(n, weights, cap)
    rng = random.Random(seed)
    mixture = []
    for (name, records), count in zip(sources, counts):
        mixture += [{**records[i], "mix": {"source": name, "index": i}} for i in draw(len(records), count, rng)]
    rng.shuffle(mixture)
    return mixture, counts


def _source_key(path: str) -> str:
    """What makes two sources the same: the resolved path of a local file or folder (so
    `A.jsonl` and `./A.jsonl` match), the text of a hub id."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def mix_files(specs: list[str], output: str, *, n: int, cap: int | None = None, seed: int = 0,
              any_shape: bool = False) -> list[int]:
    """Write the mixture of the `PATH[:WEIGHT]` sources to `output` (JSONL, atomically, replacing
    an existing file), print one line of counts per source and return the counts.

    ValueError (one line, nothing written): n < 1 or beyond MAX_RECORDS / MAX_PASSES, a weight
    that is no positive number, some sources weighted and others not, a source given twice (by
    any path) or unreadable or empty, a record `posttrain sft` cannot read (unless `any_shape`),
    n beyond the caps.
    """
    from posttrain.data import sft_messages
    from posttrain.data.records import read_records
    from posttrain.scoring.files import check_output, write_jsonl_atomic

    if not 1 <= n <= MAX_RECORDS:
        raise ValueError(f"--n {n}: expected 1 to {MAX_RECORDS} records" if n >= 1
                         else f"--n {n}: expected at least 1 record")
    sources = [parse_source(s) for s in specs]
    if not sources:
        raise ValueError("no sources given")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("give every source a weight (PATH:W) or none (examples-proportional); got "
                         + " ".join(specs))
    paths = [s.path for s in sources]
    keys = [_source_key(p) for p in paths]
    twice = [p for i, p in enumerate(paths) if keys[i] in keys[:i]]
    if twice:
        first = [paths[keys.index(_source_key(p))] for p in twice]
        raise ValueError("source given twice: " + ", ".join(p if p == f else f"{p} (= {f})"
                                                             for p, f in zip(twice, first)))
    for path in paths:
        check_output(output, path)
    loaded = [(path, read_records(path)) for path in paths]
    total = sum(len(records) for _, records in loaded)
    if n > MAX_PASSES * total:
        raise ValueError(f"--n {n} is more than {MAX_PASSES} × the {_count(total, 'record')} of the sources "
                         f"({MAX_PASSES * total})")
    if not any_shape:
        for path, records in loaded:
            for index, record in enumerate(records):
                sft_messages(record, source=path, index=index)
    weights = [s.weight for s in sources] if all(weighted) else None
    mixture, counts = mix_records(loaded, n, weights=weights, cap=cap, seed=seed)
    write_jsonl_atomic(output, mixture)
    print(f"wrote {_count(len(mixture), 'record')} to {output}")
    for (path, records), count in zip(loaded, counts):
        print(f"  {path}: {count} of {_count(len(records), 'record')} ({count / len(mixture):.1%} of the mixture, "
              f"{count / len(records):.2f} passes)")
    return counts


def add_parser(data_sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = data_sub.add_parser(name, help="A task mixture: N records drawn from several sources by weight, with a "
                            "cap per source (Flan/T5 mixing).")
    p.add_argument("sources", nargs="+", metavar="SOURCE[:WEIGHT]",
                   help="record files (or folders, hub ids); without weights, examples-proportional")
    p.add_argument("--n", type=int, required=True,
                   help=f"records in the mixture (at most {MAX_RECORDS:,} and {MAX_PASSES} × the sources' records)")
    p.add_argument("--cap-per-source", type=int, default=None,
                   help="at most this many records from any source (default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and the shuffle (default: 0)")
    p.add_argument("--any-shape", action="store_true",
                   help="mix records of any shape (default: each must be a record `posttrain sft` reads: "
                        "prompt/completion, Alpaca or messages)")
    p.add_argument("--output", required=True,
                   help="JSONL file of the mixture; an existing file is replaced (atomically, once the mixture "
                        "is drawn)")
    return p


def run(args: argparse.Namespace) -> int:
    mix_files(args.sources, args.output, n=args.n, cap=args.cap_per_source, seed=args.seed,
              any_shape=args.any_shape)
    return 0
