"""RESULTS.md's section for runs made with `run.py --precision fp32`: both tools training in fp32,
the only precision a CPU without native bf16 (no avx512_bf16 / amx_bf16) trains at with posttrain
(it refuses bf16 there; `precision: auto` picks fp32).

These runs are kept apart from the bf16 tables (their files are results/<date>-full-fp32.json,
which run.py's `earlier_reports` does not read): the issue's targets were set on bf16 runs, and an
fp32 step is bound by fp32 GEMMs at about half the bf16 rate, so their ratios answer another
question — how the two tools compare on such a machine — and must not replace a bf16 row.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def reports(exclude: Path | None = None) -> list[dict]:
    """Every fp32 run under results/, oldest first (quick ones too: a row prefers a full run)."""
    paths = sorted(p for mode in ("full", "quick") for p in RESULTS.glob(f"*-{mode}-fp32.json"))
    return [json.loads(p.read_text()) for p in paths if exclude is None or p.resolve() != exclude.resolve()]


NOTES = [
    "F1 (results/2026-12-01-1247-full-fp32.json, posttrain 116f601; the bf16 rows' code, no lever of its own): "
    "the ratios are lower than the bf16 runs' for the same work — DPO 1.55× (paired 1.56×, 1.51–1.79) against "
    "R5's 1.84×, GRPO 1.82× (paired 1.86×) against R4's 1.93×, PPO 1.14× (paired 1.14×) against R5's 1.29× — "
    "as an fp32 step is more bound by its GEMMs (the fp32 ceiling here is 130 GFLOP/s), which both tools run "
    "with the same kernels: posttrain's DPO step ran at 93 % of that ceiling by the nominal FLOP count (its "
    "prefix sharing does less arithmetic than the count), TRL's at 60 %. posttrain's DPO step times vary by "
    "batch (3.8–7.8 s over the same 6 batches in every repeat; the pairs' lengths differ) and by repeat (its "
    "first repeat's median step 6.1 s, the second's 4.7 s), which the paired ratio's range (1.51–1.79) shows.",
    "Memory in F1: DPO 0.75 of TRL's peak (R5: 0.77), GRPO 1.01 (R4: 1.06), PPO 1.06 (R5: 1.00). Not profiled "
    "(`--profile` is for bf16 runs). A likely share of PPO's and GRPO's excess: posttrain's sampler decodes from "
    "its own copy of the policy's weights in the sampling dtype (`sampling/decoders.py`), which in fp32 is "
    "134.5 M × 4 bytes ≈ 0.54 GB where it is 0.27 GB in bf16; TRL decodes from the policy itself. "
    "PPO's `counts equal` reads NO because the two tools' sampled responses differ in length by chance "
    "(611 against 630 generated tokens), as the bf16 PPO row's note explains; prompts and episodes are equal.",
]
"""What the fp32 runs showed, written after reading them (figures from the named results file)."""


def section(runs: list[dict]) -> list[str]:
    """Markdown lines: the fp32 runs, then one table row per (workload, model), each from its best run
    (both tools ran > full > newer); nothing when there is no fp32 run."""
    if not runs:
        return []
    import run as harness  # run.py beside this file; imported here because run.py imports this module

    best: dict[tuple[str, str], tuple[tuple, int, dict]] = {}
    for k, report in enumerate(runs):
        for row in report["rows"]:
            key = (row["workload"], row["model"])
            rank = harness.row_rank(report, row)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, k, row)
    order = [(w, m) for w in harness.UNITS for m in harness.MODELS]
    rows = [(best[key][1], best[key][2]) for key in order if key in best]
    used = sorted({k for k, _ in rows}, key=lambda k: runs[k]["meta"]["date"])
    label = {k: f"F{i + 1}" for i, k in enumerate(used)}
    lines = ["", "## On a CPU without native bf16 (fp32 on both sides)", "",
             "`run.py --precision fp32`: the same work and rules as above, but both tools train in fp32 (no "
             "autocast), as posttrain must on a CPU without avx512_bf16 or AMX. These rows do not replace the bf16 "
             "rows above, against which the targets are judged; they show how the two tools compare on such a "
             "machine. FLOP rate as a share of the run's fp32 matmul ceiling.", "", "Runs:", ""]
    for k in used:
        meta, mm = runs[k]["meta"], runs[k]["matmul"]
        m = meta["machine"]
        lines.append(f"- **{label[k]}** {meta['date']}, {'QUICK' if meta['quick'] else 'full'}, {meta['repeats']} "
                     f"repeat(s), posttrain {meta['versions']['posttrain_commit']}, {m['cpu']}, {m['cores']} cores, "
                     f"native bf16: {m['bf16_native']}, {meta['threads']} threads: `{meta['command']}`; fp32 matmul "
                     f"ceiling {mm['ceiling_fp32'] / 1e9:.0f} GFLOP/s; allocator for both tools: "
                     f"{harness.ALLOCATOR_WORDS[meta.get('allocator', 'glibc')]}."
                     + (f" {meta['note']}" if meta.get("note") else ""))
    lines += ["", "| workload | model | per step | run | posttrain | TRL | posttrain / TRL | peak RSS posttrain | "
              "peak RSS TRL | RSS ratio | posttrain TFLOP/s (% fp32 ceiling) | TRL | counts equal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, row in rows:
        unit = harness.UNITS[row["workload"]][1]
        pt, trl = row["posttrain"], row["trl"]
        both = "error" not in pt and "error" not in trl
        ratio = rss = "—"
        if both:
            ratio = f"**{pt['throughput']['median'] / trl['throughput']['median']:.2f}×**"
            paired = harness.paired_ratio(runs[k]["runs"], row["workload"], row["model"])
            if paired and paired["n"] > 1:
                ratio += f"; paired {paired['median']:.2f}× ({paired['min']:.2f}–{paired['max']:.2f})"
            rss = f"{pt['peak_rss_gb']['median'] / trl['peak_rss_gb']['median']:.2f}"
        equal = "yes" if row.get("counts_equal") else ("**NO**" if "counts_equal" in row else "—")
        lines.append(f"| {row['workload']} | {row['model']} | {row['per_step']} | {label[k]} | "
                     f"{harness._cell(pt, 'throughput', unit)} | {harness._cell(trl, 'throughput', unit)} | {ratio} | "
                     f"{harness._cell(pt, 'peak_rss_gb', 'GB')} | {harness._cell(trl, 'peak_rss_gb', 'GB')} | {rss} | "
                     f"{_flops(pt, harness)} | {_flops(trl, harness)} | {equal} |")
    return lines + [""] + [f"- {note}" for note in NOTES]


def _flops(side: dict, harness) -> str:
    if "error" in side or "tflops" not in side:
        return "—"
    return f"{harness.fmt_spread(side['tflops'], digits=2)} ({100 * side['fraction_of_fp32_ceiling']:.0f} %)"
