"""`posttrain best-of-n`: SFT records from scored lists — best-of-N and rejection-sampling data.

The input is what `posttrain judge --judge rm:…|fn:… --keep-all` writes: one record per prompt,
`{prompt, responses, scores, finish_reasons?, ...}`. Per record, the candidates are its replies
ranked by score, highest first (ties in record order); then

* best (no threshold): the first candidate — best-of-N sampling distilled into SFT data
  (Nakano et al. 2021, WebGPT §3.2; RAFT, Dong et al. 2023);
* `threshold` T: every candidate scoring ≥ T, an identical reply once — rejection-sampling
  fine-tuning, which keeps every distinct correct answer (Yuan et al. 2023, RFT §3; the
  "ReST-EM" E-step, Singh et al. 2023).

A reply cut off at max_new_tokens (finish_reason "length") is no candidate unless `keep_cut_off`:
its completion would end with the EOS the chat template appends, teaching the model to stop
mid-sentence. A record whose highest and lowest scores differ by less than `min_gap` is left
out: the judge saw too little difference for its best to mean much (0 keeps every record).

Each output line is `{"prompt", "completion", "best_of_n": {score, rank, source_index,
response_index}}` — the prompt as the input has it (string or message list), the reply as the
completion — which `posttrain sft` reads unchanged (it ignores the provenance object).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from posttrain.data import ScoredResponses, read_records, scored_responses
from posttrain.scoring.files import check_output, write_jsonl_atomic

CUT_OFF = "length"
"""The finish reason of a reply that hit max_new_tokens."""


@dataclass
class BestOfNSummary:
    """What `best_of_n_file` did, for its closing line."""

    records: int = 0
    responses: int = 0
    written: int = 0
    left_out: Counter = field(default_factory=Counter)
    """Replies not selected, by reason (not counting those of records within the gap)."""
    records_left_out: Counter = field(default_factory=Counter)
    """Records that gave no SFT record, by reason."""
    mean_score: float = 0.0
    """Mean score of every reply read."""
    mean_selected: float = 0.0
    """Mean score of the replies written."""

    def line(self, output: str) -> str:
        parts = [f"read {self.records} records ({self.responses} responses, mean score {self.mean_score:.4g}); "
                 f"wrote {self.written} SFT record{'s' if self.written != 1 else ''} to {output} (mean score {self.mean_selected:.4g})"]
        if self.left_out:
            parts.append("left out " + ", ".join(f"{n} {why}" for why, n in self.left_out.most_common()))
        if self.records_left_out:
            parts.append(f"{sum(self.records_left_out.values())} records gave none ("
                         + ", ".join(f"{n} {why}" for why, n in self.records_left_out.most_common()) + ")")
        return "; ".join(parts)


def ranks(scores: list[float]) -> list[int]:
    """Each score's 1-based place, highest first; equal scores in list order (so rank 1 is the first best)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    place = [0] * len(scores)
    for rank, i in enumerate(order, start=1):
        place[i] = rank
    return place


def select(sample: ScoredResponses, *, threshold: float | None = None, min_gap: float = 0.0,
           keep_cut_off: bool = False) -> tuple[list[int], Counter, str | None]:
    """(indices of the replies to keep, best first; replies left out by reason; why the record
    gave nothing, or None). See the module docstring for the rules."""
    scores, left_out = sample.scores, Counter()
    if max(scores) - min(scores) < min_gap:
        return [], left_out, f"with scores within the gap {min_gap:g}"
    place = ranks(scores)
    candidates = sorted(range(len(scores)), key=lambda i: place[i])
    if not keep_cut_off:
        left_out["cut off at max_new_tokens"] = sum(sample.finish_reasons[i] == CUT_OFF for i in candidates)
        candidates = [i for i in candidates if sample.finish_reasons[i] != CUT_OFF]
    if threshold is None:
        left_out["not the best"] = len(candidates[1:])
        kept = candidates[:1]
    else:
        kept = []
        for i in candidates:
            if scores[i] < threshold:
                left_out[f"below the threshold {threshold:g}"] += 1
            elif any(sample.responses[i] == sample.responses[k] for k in kept):
                left_out["duplicates"] += 1
            else:
                kept.append(i)
    if kept:
        return kept, +left_out, None  # +: without the zero counts
    return [], +left_out, "with every reply cut off" if not candidates else f"with no reply scoring ≥ {threshold:g}"


def best_of_n_file(data: str, output: str, *, threshold: float | None = None, min_gap: float = 0.0,
                   keep_cut_off: bool = False) -> BestOfNSummary:
    """Write the SFT records selected from the scored lists in `data` to `output` (JSONL, via a
    temporary file renamed at the end); print and return the summary.

    Every record is validated first. Errors (ValueError, one line): a bad option or record
    (`FILE: record N: field 'F': …`), an unwritable `output` (`check_output`: `data` itself, a
    folder, or in a missing folder), or no reply selected at all — then
    nothing is written.
    """
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"--threshold={threshold}: expected a finite number")
    if not (math.isfinite(min_gap) and min_gap >= 0):
        raise ValueError(f"--min-gap={min_gap}: expected a finite number ≥ 0")
    check_output(output, data)
    records = read_records(data)
    samples = [scored_responses(r, source=str(data), index=i) for i, r in enumerate(records)]
    every_score = [s for sample in samples for s in sample.scores]
    summary = BestOfNSummary(records=len(records), responses=len(every_score),
                             mean_score=sum(every_score) / len(every_score))
    out, selected_scores = [], []
    for index, (record, sample) in enumerate(zip(records, samples)):
        kept, left_out, none_because = select(sample, threshold=threshold, min_gap=min_gap,
                                              keep_cut_off=keep_cut_off)
        summary.left_out.update(left_out)
        if none_because:
            summary.records_left_out[none_because] += 1
        place = ranks(sample.scores)
        for i in kept:
            out.append({"prompt": record["prompt"], "completion": sample.responses[i],
                        "best_of_n": {"score": sample.scores[i], "rank": place[i], "source_index": index,
                                      "response_index": i}})
            selected_scores.append(sample.scores[i])
    summary.written = len(out)
    if not out:
        reasons = ", ".join(f"{n} {why}" for why, n in summary.records_left_out.most_common())
        raise ValueError(f"{data}: no reply selected from its {len(records)} records ({reasons}); "
                         f"{output} not written")
    summary.mean_selected = sum(selected_scores) / len(selected_scores)
    write_jsonl_atomic(output, out)
    print(summary.line(output))
    return summary
