"""The `posttrain score` and `posttrain judge` commands: a data file in, a JSONL file out.

Both validate the output path (`check_output`) and every record before loading any model, and
write the output to a temporary file in the same folder that is renamed into place only once
everything is scored, so a failed run leaves no file that a re-run could mistake for a finished
one. A `judge` run that would write nothing (every record or pair left out) is an error naming why.

`judge` reads a samples file (records `{prompt | messages, responses, finish_reasons?}`, as
`posttrain sample` writes them) and writes what `posttrain rm` and `posttrain dpo` read:

* `rm:` / `fn:` — one scored list per record, `{prompt, responses, scores, ...}`; those tools
  apply their own `--pairing` and `--min-score-gap`. A record whose scores can form no pair
  (one response, or all scores equal) is left out and counted, unless `keep_all`: then every
  record with a non-empty response is written, for `posttrain best-of-n` (which also wants the
  prompts every reply got right), and `posttrain rm` / `dpo` refuse the file.
* `llm:` — pairs `{prompt, chosen, rejected, ...}`, chosen by `JUDGE_PAIRINGS`; ties and
  pairs within `min_score_gap` of 0.5 are left out and counted.

An empty or whitespace-only response (a model that emitted EOS at once) is left out of scoring
and pairing, and counted: neither tool accepts an empty reply. A scored list keeps the others
with their finish_reasons; a pair's chosen_index / rejected_index still index the source
record's "responses".

The source record's other fields are kept (ids, "sampling" provenance), except the fields of
a preference shape, which would change what the record means; each record gets a "judge"
object (spec, rubric, probabilities), which posttrain's preference loader ignores.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from posttrain.data import SampledResponses, read_records, sampled_responses, scoring_conversation
from posttrain.scoring.function import ScoreError
from posttrain.scoring.judge import (DEFAULT_TIE_MARGIN, LLMJudge, Verdict, check_pairing_options, load_rubric,
                                     select_pairs)
from posttrain.scoring.specs import Scorer, is_pairwise, load_judge, load_scorer, pointwise_spec

NOT_CARRIED = ("responses", "finish_reasons", "scores", "chosen", "rejected", "margin", "messages", "judge")
"""Source fields a judged record does not keep: the preference shapes' own, and the chat prompt
(written as "prompt")."""


def check_output(output: str, data: str) -> None:
    """ValueError unless `output` is a file that can be written: not the input file `data` itself
    (compared resolved, so `../` and symlinks count), not a folder, and in a folder that exists
    (as `posttrain sample` has it: a typo in the folder should not make a new one)."""
    out = Path(output)
    if out.resolve() == Path(data).resolve():
        raise ValueError(f"--output {output} is the input file itself")
    if out.is_dir():
        raise ValueError(f"--output {output} is a folder; expected a file name")
    if not out.parent.is_dir():
        raise ValueError(f"--output {output}: folder {out.parent} does not exist")


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    """Write `records` as JSONL to `path` via a temporary file in the same folder, renamed at the
    end. The folder must exist (`check_output`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def score_file(data: str, output: str | None = None, *, judge: str | None = None, model: str | None = None,
               batch_size: int = 8, precision: str = "auto") -> list[float]:
    """Score every `{prompt, response}` / `{messages}` record of `data` with the rm: or fn: spec
    `judge` (or the reward model folder `model`, short for rm:MODEL); write the records with a
    "score" field to `output` (stdout if None). Returns the scores."""
    if (judge is None) == (model is None):
        raise ValueError("give exactly one of --judge SPEC and --model PATH (short for --judge rm:PATH)")
    spec = judge if judge is not None else f"rm:{model}"
    pointwise_spec(spec)
    if output is not None:
        check_output(output, data)
    records = read_records(data)
    inputs = [scoring_conversation(r, source=str(data), index=i) for i, r in enumerate(records)]
    scorer = load_scorer(spec, batch_size=batch_size, precision=precision)
    try:
        scores = scorer.score([p for p, _ in inputs], [r for _, r in inputs], records)
    except ScoreError as err:
        raise ValueError(f"{data}: record {err.row + 1}: {err}") from None
    scored = [{**record, "score": s} for record, s in zip(records, scores)]
    if output is None:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    else:
        write_jsonl_atomic(output, scored)
    # On stderr when the records go to stdout, so a pipe receives only records.
    print(f"scored {len(records)} records of {data} with {spec}" + (f"; wrote {output}" if output else ""),
          file=sys.stderr if output is None else sys.stdout)
    return scores


@dataclass
class JudgeSummary:
    """What `judge_file` did, for its closing line."""

    spec: str
    pairwise: bool
    """An llm: judge (pairs written) rather than rm:/fn: (scored lists written)."""
    records: int = 0
    responses: int = 0
    """Responses read, the empty ones included."""
    empty: int = 0
    """Empty or whitespace-only responses, left out of scoring and pairing."""
    written: int = 0
    """Records (rm/fn: scored lists) or pairs (llm) written."""
    left_out: int = 0
    """rm/fn: records whose scores form no pair (under two non-empty responses, or all scores equal);
    with keep_all, records with no non-empty response."""
    too_few: int = 0
    """rm/fn: records with under two non-empty responses."""
    keep_all: bool = False
    """rm/fn: records whose scores form no pair were written too."""
    mean_score: float = 0.0
    """rm/fn: the mean score of the scored responses (a verifiable task's accuracy)."""
    compared: int = 0
    """llm: pairs judged in both orders."""
    ties: int = 0
    """llm: judged pairs whose two orders disagree by more than the tie margin."""
    within_gap: int = 0
    """llm: pairs the pairing picked but left out as within min_score_gap of 0.5."""
    position_biased: int = 0
    """llm: judged pairs where both orders picked the same position."""

    def line(self, output: str) -> str:
        head = (f"judged {self.records} records ({self.responses} responses, {self.empty} empty responses left out) "
                f"with {self.spec}: ")
        if not self.pairwise:
            why = "no non-empty response" if self.keep_all else "no two different scores"
            return head + (f"mean score {self.mean_score:.4g}; wrote {self.written} scored lists to {output}; "
                           f"left out {self.left_out} records with {why}")
        rate = self.position_biased / self.compared if self.compared else 0.0
        return head + (f"{self.compared} pairs compared in both orders, {self.written} pairs written to {output}, "
                       f"{self.ties} ties, {self.within_gap} within the score gap; position bias in "
                       f"{self.position_biased}/{self.compared} pairs ({rate:.1%})")

    def nothing_written(self) -> str:
        """Why no record or pair was written, and what to try; one line."""
        if self.empty == self.responses:
            return (f"all {self.responses} responses of the {self.records} records are empty or whitespace: nothing "
                    "to judge; sample again with another --model or more --max-new-tokens")
        if not self.pairwise:
            equal = self.left_out - self.too_few
            return (f"no record has two different scores ({self.too_few} with under two non-empty responses, {equal} "
                    f"with all scores equal; mean score {self.mean_score:.4g}), so there is no pair for `posttrain rm` "
                    "/ `dpo`; sample more responses per prompt (--n) or at a higher --temperature, or pass --keep-all "
                    "to write the scored lists for `posttrain best-of-n`")
        if not self.compared:
            return ("no record has two different non-empty responses: nothing to compare; sample more responses per "
                    "prompt (--n) or at a higher --temperature")
        if self.ties == self.compared:
            return (f"all {self.compared} pairs were ties (position bias {self.position_biased}/{self.compared}): "
                    "the judge cannot tell these replies apart; try a stronger --judge model or a larger --tie-margin")
        return (f"no pair written: of {self.compared} pairs compared, {self.ties} were ties and {self.within_gap} of "
                "those --pairing picked were within --min-score-gap of 0.5; try a smaller --min-score-gap, "
                "--pairing all, a larger --tie-margin or a stronger --judge model")


def _prompt_field(record: dict) -> Any:
    return record["prompt"] if record.get("prompt") is not None else record["messages"]


def _carried(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in NOT_CARRIED}


def without_empty(samples: list[SampledResponses]) -> tuple[list[SampledResponses], list[list[int]], int]:
    """`samples` without their empty or whitespace-only responses (finish_reasons kept aligned),
    each record's source indices of the responses kept, and how many were left out."""
    kept = [[i for i, response in enumerate(s.responses) if response.strip()] for s in samples]
    out = [SampledResponses(s.prompt, [s.responses[i] for i in k], [s.finish_reasons[i] for i in k])
           for s, k in zip(samples, kept)]
    return out, kept, sum(len(s.responses) - len(k) for s, k in zip(samples, kept))


def score_samples(records: list[dict], samples: list[SampledResponses], scorer: Scorer, *, source: str,
                  batch_size: int = 8, keep_all: bool = False) -> tuple[list[dict], JudgeSummary]:
    """Scored lists `{prompt, responses, scores, judge, ...}` of the records whose non-empty
    responses' scores can form a pair (keep_all: of those with a non-empty response), and the
    summary. Responses are scored batch_size at a time across records."""
    samples, kept, empty = without_empty(samples)
    rows = [(r, i) for r, sample in enumerate(samples) for i in range(len(sample.responses))]
    scores: list[float] = []
    bar = tqdm(total=len(rows), desc=f"scoring ({scorer.spec})", unit="response", disable=None, leave=False,
               file=sys.stderr)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        try:
            scores += scorer.score([samples[r].prompt for r, _ in chunk],
                                   [samples[r].responses[i] for r, i in chunk], [records[r] for r, _ in chunk],
                                   finished=[samples[r].finish_reasons[i] == "eos" for r, i in chunk])
        except ScoreError as err:
            r, i = chunk[err.row]
            raise ValueError(f"{source}: record {r + 1}: field 'responses[{kept[r][i]}]': {err}") from None
        bar.update(len(chunk))
    bar.close()
    summary = JudgeSummary(scorer.spec, False, records=len(records), responses=len(rows) + empty, empty=empty,
                           keep_all=keep_all, mean_score=sum(scores) / len(scores) if scores else 0.0)
    out, start = [], 0
    for record, sample in zip(records, samples):
        mine = scores[start: start + len(sample.responses)]
        start += len(sample.responses)
        summary.too_few += len(sample.responses) < 2
        if len(set(mine)) < (1 if keep_all else 2):
            summary.left_out += 1
            continue
        out.append({**_carried(record), "prompt": _prompt_field(record), "responses": sample.responses,
                    "finish_reasons": sample.finish_reasons, "scores": mine, "judge": {"spec": scorer.spec}})
    summary.written = len(out)
    return out, summary


def judge_samples(records: list[dict], samples: list[SampledResponses], judge: LLMJudge, *, pairing: str = "all",
                  min_score_gap: float = 0.0) -> tuple[list[dict], JudgeSummary]:
    """Preference pairs `{prompt, chosen, rejected, judge, ...}` from judging every pair of each
    record's non-empty responses in both orders (one batched call for the whole file), and the
    summary. Two identical responses are not judged: they are even (0.5), so never a pair."""
    check_pairing_options(pairing, min_score_gap, judge.tie_margin)
    samples, kept, empty = without_empty(samples)
    keys = [(r, i, j) for r, s in enumerate(samples) for i in range(len(s.responses))
            for j in range(i + 1, len(s.responses)) if s.responses[i] != s.responses[j]]
    verdicts = judge.compare([samples[r].prompt for r, _, _ in keys], [samples[r].responses[i] for r, i, _ in keys],
                             [samples[r].responses[j] for r, _, j in keys])
    even = Verdict(0.5, 0.5, 0.5, tie=False, position_bias=False)
    by_record = [{(i, j): even for i in range(len(s.responses)) for j in range(i + 1, len(s.responses))}
                 for s in samples]
    for (r, i, j), v in zip(keys, verdicts):
        by_record[r][(i, j)] = v
    summary = JudgeSummary(judge.spec, True, records=len(records),
                           responses=sum(len(s.responses) for s in samples) + empty, empty=empty,
                           compared=len(keys), ties=sum(v.tie for v in verdicts),
                           position_biased=sum(v.position_bias for v in verdicts))
    out = []
    for record, sample, source_index, verdicts_here in zip(records, samples, kept, by_record):
        if len(sample.responses) < 2:  # its other responses were empty: no pair, and nothing to rank
            continue
        pairs, within_gap = select_pairs(len(sample.responses), verdicts_here, pairing=pairing,
                                         min_score_gap=min_score_gap)
        summary.within_gap += within_gap
        for chosen, rejected, v in pairs:
            chosen_first = chosen < rejected  # v is the verdict with the lower index shown first
            meta = {**judge.metadata(), "pairing": pairing, "chosen_index": source_index[chosen],
                    "rejected_index": source_index[rejected],
                    "p_chosen": v.p_first if chosen_first else 1 - v.p_first,
                    "p_a_chosen_first": v.p_ab if chosen_first else v.p_ba,
                    "p_a_rejected_first": v.p_ba if chosen_first else v.p_ab,
                    "position_bias": v.position_bias}
            out.append({**_carried(record), "prompt": _prompt_field(record), "chosen": sample.responses[chosen],
                        "rejected": sample.responses[rejected], "judge": meta})
    summary.written = len(out)
    return out, summary


def judge_file(data: str, judge: str, output: str, *, rubric: str | None = None, pairing: str | None = None,
               min_score_gap: float | None = None, tie_margin: float | None = None, keep_all: bool = False,
               batch_size: int = 8, precision: str = "auto") -> JudgeSummary:
    """Judge the samples file `data` with the spec `judge` and write `output` (see the module
    docstring). rubric, pairing, min_score_gap and tie_margin apply to llm: judges only
    (defaults: the default rubric, "all", 0, DEFAULT_TIE_MARGIN); given for rm:/fn:, they are
    an error, as keep_all is for llm:. Prints and returns the summary."""
    pairwise = is_pairwise(judge)
    if keep_all and pairwise:
        raise ValueError(f"--keep-all: only for an rm: or fn: judge; {judge} writes pairs, never scored lists")
    llm_only = {"--rubric": rubric, "--pairing": pairing, "--min-score-gap": min_score_gap,
                "--tie-margin": tie_margin}
    given = [flag for flag, value in llm_only.items() if value is not None]
    if given and not pairwise:
        raise ValueError(f"{', '.join(given)}: only for an llm: judge; {judge} writes scored lists, which "
                         "`posttrain rm` and `posttrain dpo` pair with their own --pairing and --min-score-gap")
    pairing = "all" if pairing is None else pairing
    min_score_gap = 0.0 if min_score_gap is None else min_score_gap
    tie_margin = DEFAULT_TIE_MARGIN if tie_margin is None else tie_margin
    if pairwise:  # options and the rubric file fail before the records are read
        check_pairing_options(pairing, min_score_gap, tie_margin)
        load_rubric(rubric)
    check_output(output, data)
    records = read_records(data)
    samples = [sampled_responses(r, source=str(data), index=i, min_responses=2 if pairwise else 1)
               for i, r in enumerate(records)]
    if pairwise:
        llm = load_judge(judge, rubric=rubric, tie_margin=tie_margin, batch_size=batch_size, precision=precision)
        out, summary = judge_samples(records, samples, llm, pairing=pairing, min_score_gap=min_score_gap)
    else:
        scorer = load_scorer(judge, batch_size=batch_size, precision=precision)
        out, summary = score_samples(records, samples, scorer, source=str(data), batch_size=batch_size,
                                     keep_all=keep_all)
    if not out:  # `posttrain rm` / `dpo` refuse an empty file: say why here instead
        raise ValueError(f"{data}: wrote nothing to {output}: {summary.nothing_written()}")
    write_jsonl_atomic(output, out)
    print(summary.line(output))
    return summary
