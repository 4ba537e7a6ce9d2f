"""RESULTS.md's last measured sections: what each lever gave, and for every SmolLM2 row short of
a target, what is left and whether this machine could close it.

Speed: a step of posttrain must do at least the GEMMs of its passes (gemm_floor.py, timed on this
machine). If TRL's step ÷ the target is shorter than that floor, no change of posttrain's code can
reach the target on this machine for the same work; if it is shorter than the GEMMs plus every
layer's attention with torch's own kernel, not without a faster attention kernel. Otherwise the
row is open, and the profile says where posttrain's step spends the time above those floors.

Memory: the profile's runtime + weights + optimizer state + activations are alive together at
the end of a forward, whatever the allocator does (gradients are left out: with one micro-batch
a step they are freed by then). If that sum is above the target (0.6 × TRL's peak), eager
execution of the same work cannot meet it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from breakdown import CATEGORIES

RESULTS = Path(__file__).resolve().parent / "results"
# The profile's categories a step cannot drop for the same work: training passes and the optimizer,
# and the no-grad forwards of the reference / old policy / reward model (TRL runs them too).
REQUIRED = ("forward", "backward", "optimizer", "no-grad forward")
ALIVE_AT_FORWARD_END = ("runtime", "weights", "optimizer state", "activations")
# The attention floor is timed alone: in the profiled SFT step its kernels took 0.58 s where the
# standalone timing gave 0.65 s. A needed step within this factor of GEMMs + attention is
# reported as marginal rather than out of reach.
MARGIN = 0.85


def newest(pattern: str) -> dict | None:
    """The newest results/<pattern> JSON, or None."""
    paths = sorted(RESULTS.glob(pattern))
    return json.loads(paths[-1].read_text()) if paths else None


def newest_floors() -> dict | None:
    """Each workload's floor from the newest gemm-floor-*.json that has it (rows come from
    different runs, each floor measured for its own run), or None when there is none:
    {"floors": {workload: floor}, "measured": {workload: "<date> for run <file>"}}."""
    merged = {"floors": {}, "measured": {}}
    for path in sorted(RESULTS.glob("gemm-floor-*.json")):
        data = json.loads(path.read_text())
        for workload, floor in data["floors"].items():
            merged["floors"][workload] = floor
            merged["measured"][workload] = f"{data['date']} for run {data['results']}"
    return merged if merged["floors"] else None


def newest_profiles(reports: list[dict]) -> dict[tuple[str, str], tuple[dict, list[dict]]]:
    """(workload, model) → (meta, profiled runs) of the newest profiled run that has it."""
    found = {}
    for report in reports:
        if not report["meta"].get("profile"):
            continue
        for row in report["rows"]:
            runs = [r for r in report["runs"] if r["workload"] == row["workload"] and r["model"] == row["model"]
                    and "profile" in r]
            if runs:
                found[(row["workload"], row["model"])] = (report["meta"], runs)
    return found


def shares(runs: list[dict], tool: str) -> dict[str, float]:
    """Median share of the timed steps' wall time per category, for one tool's profiled runs."""
    mine = [r for r in runs if r["tool"] == tool]
    totals = [sum(r["profile"]["seconds"].values()) for r in mine]
    return {c: statistics.median(r["profile"]["seconds"][c] / t for r, t in zip(mine, totals)) for c in CATEGORIES}


def memory(runs: list[dict], tool: str) -> dict[str, float]:
    """Median GB per memory part, for one tool's profiled runs."""
    mine = [r for r in runs if r["tool"] == tool]
    return {m: statistics.median(r["profile"]["memory"][m] for r in mine) / 1e9 for m in mine[0]["profile"]["memory"]}


def speed_verdict(ratio: float, target: float, step: float, needed: float, gemm: float | None,
                  attention: float | None, share: dict[str, float] | None, required: float | None) -> str:
    """Whether a row's speed target is met, out of reach (below a floor), marginal or open; seconds a
    step (required: posttrain's time in the REQUIRED categories, from the profile shares)."""
    if ratio >= target:
        return "met"
    if gemm is not None and gemm > needed:
        return f"out of reach on this machine: the GEMMs alone take {gemm:.2f} s > {needed:.2f} s"
    if attention is not None and MARGIN * (gemm + attention) > needed:
        return (f"out of reach with this torch's kernels: GEMMs and attention take {gemm + attention:.2f} s "
                f"> {needed:.2f} s")
    if attention is not None and gemm + attention > needed:
        return (f"marginal: GEMMs and attention take {gemm + attention:.2f} s, less than "
                f"{100 * (1 - MARGIN):.0f} % above the needed {needed:.2f} s")
    if not share:
        return "open: no profile"
    extra = [f"{c} {step * share[c]:.2f} s" for c in CATEGORIES if c not in REQUIRED and step * share[c] >= 0.05]
    above = (f"{required - gemm - (attention or 0):.2f} s above their GEMMs and attention" if gemm is not None
             else f"{required:.2f} s")
    return f"open: {step - needed:.2f} s to cut; required passes {above}" \
        + (f"; besides them {', '.join(extra)}" if extra else "")


def targets_section(rows: list[dict], profiles: dict, target_speedup: dict[str, float],
                    target_rss: float) -> list[str]:
    """The 'What is left' section for the SmolLM2 rows (rows: RESULTS.md's picked rows)."""
    floor = newest_floors()
    speed, mem = [], []
    for row in rows:
        pt, trl, workload = row["posttrain"], row["trl"], row["workload"]
        if row["model"] != "smollm2" or "error" in pt or "error" in trl:
            continue
        profiled = profiles.get((workload, "smollm2"))
        ratio = pt["throughput"]["median"] / trl["throughput"]["median"]
        needed = trl["seconds_per_step"]["median"] / target_speedup[workload]
        step = pt["seconds_per_step"]["median"]
        gemm = floor["floors"].get(workload, {}).get("seconds") if floor else None
        attention = floor["floors"].get(workload, {}).get("attention_seconds") if floor else None
        share = shares(profiled[1], "posttrain") if profiled else None
        required = step * sum(share[c] for c in REQUIRED) if share else None
        verdict = speed_verdict(ratio, target_speedup[workload], step, needed, gemm, attention, share, required)
        speed.append(f"| {workload} | ≥ {target_speedup[workload]}× | {ratio:.2f}× | {step:.2f} | {needed:.2f} | "
                     + (f"{gemm:.2f}" if gemm is not None else "—") + " | "
                     + (f"{attention:.2f}" if attention is not None else "—") + " | "
                     + (f"{required:.2f}" if required is not None else "—") + f" | {verdict} |")
        if profiled:
            parts = memory(profiled[1], "posttrain")
            alive = sum(parts[m] for m in ALIVE_AT_FORWARD_END)
            limit = target_rss * trl["peak_rss_gb"]["median"]
            peak = pt["peak_rss_gb"]["median"]
            if peak <= limit:
                verdict = "met"
            elif alive > limit:
                verdict = f"out of reach in eager mode: {alive:.2f} GB alive at the forward's end > {limit:.2f} GB"
            else:
                verdict = f"open: {peak - alive:.2f} GB above what must be alive"
            mem.append(f"| {workload} | {peak:.2f} | {limit:.2f} | "
                       + " + ".join(f"{parts[m]:.2f}" for m in ALIVE_AT_FORWARD_END)
                       + f" = {alive:.2f} | {verdict} |")
    if not speed:
        return []
    lines = ["", "## What is left, row by row (SmolLM2)", "",
             "Speed: `now` is posttrain's throughput ÷ TRL's (the throughput table's ratio of medians), `target` "
             "its goal; `posttrain s/step` and `needed` are median seconds a step (TRL's ÷ the target), so they "
             "cross-check with `now` only roughly. `GEMM "
             "floor` the seconds the step's matrix products alone take at the model's shapes on this machine "
             "(`benchmarks/gemm_floor.py`" + (", measured " + "; ".join(sorted({m for m in floor["measured"].values()}))
                                               if floor else "")
             + "; real tokens only, a prompt once for all the replies that share it: DPO's pair, GRPO's and RLOO's "
             "group (floors measured before 2026-12-01 counted GRPO's and RLOO's prompt once a response); "
             "attention, norms, casts, the optimizer and generation left out; each product the fastest of 6 "
             "windows); `attention` every layer's causal attention, the faster of this torch's SDPA kernel (flash) "
             "and posttrain's eager attention (2–5× faster below 192 tokens, 0.75× flash's time at 4 × 256), "
             "timed alone "
             f"(verdicts within {100 * (1 - MARGIN):.0f} % of GEMMs + attention are called marginal); "
             "`required passes` posttrain's "
             "own time in training forwards, backwards, optimizer and the no-grad forwards the work needs "
             "(profile shares × this table's step time). A needed step below the GEMM floor cannot be reached "
             "on this machine by any code doing the same work; below GEMMs + attention, not without a faster "
             "attention kernel than these.", "",
             "| workload | target | now | posttrain s/step | needed s/step | GEMM floor s | attention s | required "
             "passes s | verdict |",
             "|---|---|---|---|---|---|---|---|---|", *speed]
    if mem:
        lines += ["", f"Memory: the target is {target_rss} × TRL's peak. Runtime, weights, optimizer state and "
                  "activations (profile) are all alive at the end of a forward; gradients are left out (with one "
                  "micro-batch a step they are already freed there), so the sum bounds the peak of eager "
                  "execution from below.", "",
                  "| workload | posttrain peak GB | target GB | runtime + weights + optimizer state + activations "
                  "| verdict |", "|---|---|---|---|---|", *mem]
    return lines


def step_ops_section(top: int = 8) -> list[str]:
    """Operator time inside one SFT step (benchmarks/step_ops.py's newest run per shape)."""
    newest_of = {}
    for path in sorted(RESULTS.glob("step-ops-*.json")):
        run = json.loads(path.read_text())
        newest_of[(run["rows"], run["length"])] = run
    if not newest_of:
        return []
    lines = ["", "## Inside one training step", "",
             "`benchmarks/step_ops.py`: torch.profiler's self CPU time per operator over the SFT step of "
             "levers.py's baseline (rows × tokens), seconds a step and share of the profiled step; `aten::mm` "
             "is every GEMM, the rest is what a step spends above its GEMM floor.", "",
             "| shape | threads | profiled step s | " + " | ".join(f"op {i + 1}" for i in range(top)) + " |",
             "|---|---|---|" + "---|" * top]
    for (rows, length), run in sorted(newest_of.items(), key=lambda kv: -kv[0][1]):
        ops = list(run["ops_s"].items())[:top]
        cells = [f"{name.removeprefix('aten::')} {sec:.3f} s ({100 * sec / run['step_s']:.0f} %)" for name, sec in ops]
        lines.append(f"| {rows} × {length} | {run['threads']} | {run['step_s']:.2f} | " + " | ".join(cells) + " |")
    return lines


def levers_section() -> list[str]:
    """What each lever of issue 14 measured alone gave (benchmarks/levers.py's newest run per shape)."""
    # The newest run of each shape.
    newest_of = {}
    for path in sorted(RESULTS.glob("levers-*.json")):
        run = json.loads(path.read_text())
        newest_of[(run.get("rows", 4), run.get("length", 256))] = run
    runs = list(newest_of.values())
    if not runs:
        return []
    lines = ["", "## Levers measured alone", "",
             "`benchmarks/levers.py`: one SmolLM2 SFT step (rows × tokens, loss on each row's second half, bf16 "
             "autocast, fused AdamW) per variant, each its own process, run.py's allocator settings and threads; "
             "median step of the timed steps, first step (compiling shows there), peak RSS of the timed steps "
             "(VmHWM reset after the warm-up); `against`: the variant it is compared with. Step times differ from "
             "the benchmark's SFT row (no data loading, logging or hooks here; other days' machine rate), so "
             "compare rows of this table only with each other. `compile`: "
             "`torch.compile` of the policy with an empty inductor cache; `compile-warm`: a new process over the "
             "cache it left. `in-backward`: each parameter's AdamW step run by a post-accumulate-grad hook and its "
             "gradient freed at once; it cannot clip the global norm, so it is compared with `no-clip`, and it only "
             "lowers the peak if the peak falls where gradients are alive. `recast`: one fp32 → bf16 cast of "
             "every Linear weight, what autocast pays each forward: the most that bf16 compute weights kept "
             "between optimizer steps could save a forward.", "",
             "| shape | threads | variant | against | step s | against s | first step s | peak RSS GB | against GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        by = {r["variant"]: r for r in run["results"]}
        shape = f"{run.get('rows', 4)} × {run.get('length', 256)} | {run['threads']}"
        for name, r in by.items():
            ref = by.get("no-clip" if name == "in-backward" else "baseline")
            if name == "recast":
                lines.append(f"| {shape} | recast ({r['linear_params'] / 1e6:.0f} M weights) | — | {r['median_s']:.3f} "
                             "| — | — | — | — |")
            elif ref is None or ref is r:
                lines.append(f"| {shape} | {name} | — | {r['median_s']:.2f} | — | {r['first_step_s']:.1f} | "
                             f"{r['peak_rss_gb']:.2f} | — |")
            else:
                lines.append(f"| {shape} | {name} | {ref['variant']} | {r['median_s']:.2f} | {ref['median_s']:.2f} | "
                             f"{r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} | {ref['peak_rss_gb']:.2f} |")
    return lines
