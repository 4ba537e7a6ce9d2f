"""posttrain side by side with TRL: throughput, peak memory, start-up and FLOP rate.

    .venv/bin/python benchmarks/run.py            # full: every workload and model, 3 repeats
    .venv/bin/python benchmarks/run.py --quick    # tiny model, few steps, 1 repeat: harness check (< 5 min)
    .venv/bin/python benchmarks/run.py --workloads sft --models smollm2 --repeats 5
    .venv/bin/python benchmarks/run.py --profile --repeats 1    # where time and memory go (breakdown.py)

It first runs benchmarks/setup.sh (idempotent: checks TRL 1.16.0 in .venv, installs TRL 1.12.0
for PPO into .bench/). Each (tool, workload, model) runs in its own process (benchmarks/workers/<tool>_<workload>.py)
so peak RSS belongs to that run alone; the two tools alternate (posttrain, TRL, posttrain,
TRL, …) so slow drifts of a shared machine hit both. The matmul ceiling is measured in the
same invocation, before and after the trainers. Writes benchmarks/results/<date>.json (every
raw run) and benchmarks/RESULTS.md (the table). See RESULTS.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fp32_runs  # benchmarks/fp32_runs.py, beside this script
import targets  # benchmarks/targets.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
WORK = ROOT / ".bench"
TRL_PPO_PATH = WORK / "trl-1.12.0"
MODELS = {"smollm2": "smollm2-135m-instruct", "tiny": "tiny-random"}
TOOLS = ("posttrain", "trl")
POSTTRAIN_MODULES = {"sft": "posttrain.trainers.sft", "rm": "posttrain.trainers.reward",
                     "dpo": "posttrain.trainers.dpo", "ppo": "posttrain.trainers.ppo",
                     "grpo": "posttrain.trainers.grpo", "rloo": "posttrain.trainers.grpo"}
TRL_VERSION = {"sft": "1.16.0", "rm": "1.16.0", "dpo": "1.16.0", "ppo": "1.12.0", "grpo": "1.16.0", "rloo": "1.16.0"}

# Per workload: rows a step, token lengths, and (warm-up, timed) steps for full / quick runs.
SETTINGS = {
    ("sft", "smollm2"): dict(batch_size=4, max_length=256, full=(2, 6), quick=(1, 2)),
    ("sft", "tiny"): dict(batch_size=4, max_length=256, full=(3, 20), quick=(2, 4)),
    ("rm", "smollm2"): dict(batch_size=4, max_length=256, full=(2, 6), quick=(1, 2)),
    ("rm", "tiny"): dict(batch_size=4, max_length=256, full=(3, 20), quick=(2, 4)),
    ("dpo", "smollm2"): dict(batch_size=4, max_length=256, full=(2, 6), quick=(1, 2)),
    ("dpo", "tiny"): dict(batch_size=4, max_length=256, full=(3, 20), quick=(2, 4)),
    ("ppo", "smollm2"): dict(batch_size=4, max_prompt_length=64, response_length=32, full=(1, 4), quick=(1, 1)),
    ("ppo", "tiny"): dict(batch_size=4, max_prompt_length=64, response_length=32, full=(2, 10), quick=(1, 2)),
    # GRPO / RLOO: `prompts` a step, each sampled num_generations (K) times; batch_size responses a
    # micro-batch, one optimizer step per step.
    ("grpo", "smollm2"): dict(prompts=4, num_generations=4, batch_size=4, max_prompt_length=64, response_length=32,
                              full=(2, 6), quick=(1, 2)),
    ("grpo", "tiny"): dict(prompts=4, num_generations=4, batch_size=4, max_prompt_length=64, response_length=32,
                           full=(3, 12), quick=(2, 4)),
    ("rloo", "smollm2"): dict(prompts=4, num_generations=4, batch_size=4, max_prompt_length=64, response_length=32,
                              full=(2, 6), quick=(1, 2)),
    ("rloo", "tiny"): dict(prompts=4, num_generations=4, batch_size=4, max_prompt_length=64, response_length=32,
                           full=(3, 12), quick=(2, 4)),
}
# Throughput unit per workload: (count key, label). FLOPs per real token per parameter:
# 6 for a training step (2 forward + 4 backward); DPO adds the reference forward (2).
UNITS = {"sft": ("tokens", "tok/s"), "rm": ("pairs", "pairs/s"), "dpo": ("pairs", "pairs/s"),
         "ppo": ("episodes", "episodes/s"), "grpo": ("episodes", "episodes/s"), "rloo": ("episodes", "episodes/s")}
# Workloads that sample their own responses: generated tokens/s is shown beside the episode rate.
ROLLOUT = ("ppo", "grpo", "rloo")
# Which file of write_data each workload reads.
DATA = {"sft": "sft", "rm": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompts", "rloo": "prompts"}
FLOP_FACTOR = {"sft": 6, "rm": 6, "dpo": 8}
TARGET_SPEEDUP = {"sft": 2.0, "rm": 1.5, "dpo": 2.0, "ppo": 2.0, "grpo": 2.0, "rloo": 2.0}
TARGET_RSS = 0.6
TARGET_CEILING = 0.6
# Equal work means these counts agree within COUNT_TOLERANCE, else the row is flagged. Other
# counts (tokens actually fed, with padding) may differ by design and are only shown: e.g.
# posttrain's DPO feeds each prompt once (prefix sharing) where TRL feeds it twice.
SAME_WORK = {"sft": ("rows", "tokens", "loss_tokens"), "rm": ("pairs", "tokens"),
             "dpo": ("pairs", "tokens", "loss_tokens"), "ppo": ("episodes", "generated_tokens"),
             "grpo": ("episodes", "prompt_tokens", "generated_tokens"),
             "rloo": ("episodes", "prompt_tokens", "generated_tokens")}
COUNT_TOLERANCE = 0.02


# ---------------------------------------------------------------- data


def write_data(root: Path) -> dict[str, Path]:
    """Fixed benchmark JSONL derived from examples/data, identical for every run.

    SFT records join six consecutive completions into one long reply so that every record
    is longer than max_length in both tokenizers and all rows are cut to exactly max_length
    tokens (no padding; the same tokens on both sides). Preference and prompt records are
    the example files' pairs and prompts as they are.
    """
    root.mkdir(parents=True, exist_ok=True)
    src = ROOT / "examples" / "data"
    records = [json.loads(line) for line in (src / "instructions.jsonl").read_text().splitlines() if line.strip()]
    pc = [r for r in records if "prompt" in r and "completion" in r]
    sft = [{"prompt": pc[i]["prompt"], "completion": " ".join(pc[(i + k) % len(pc)]["completion"] for k in range(6))}
           for i in range(len(pc))]
    prefs = [json.loads(line) for line in (src / "preferences.jsonl").read_text().splitlines() if line.strip()]
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in prefs if "chosen" in r]
    paths = {"sft": root / "sft.jsonl", "pairs": root / "pairs.jsonl", "prompts": root / "prompts.jsonl"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    paths["prompts"].write_text((src / "prompts.jsonl").read_text())
    return paths


# ---------------------------------------------------------------- running workers


# The allocators a run may give both tools (--allocator): glibc with the settings that keep freed
# memory (no mmap, no trim: faster steps, memory never returned), or tcmalloc preloaded, as
# scripts/demo.sh runs posttrain.
ALLOCATORS = ("glibc", "tcmalloc")
ALLOCATOR_WORDS = {"glibc": "glibc, `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`",
                   "tcmalloc": "tcmalloc (`LD_PRELOAD` libtcmalloc_minimal.so.4)"}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def allocator_env(allocator: str) -> dict[str, str]:
    if allocator == "tcmalloc":
        return {"LD_PRELOAD": TCMALLOC}
    return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def worker_env(workload: str, tool: str, threads: int, allocator: str = "glibc",
               precision: str = "bf16") -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # The same allocator and thread count for both tools.
        **allocator_env(allocator),
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1",
        "POSTTRAIN_DEBUG": "1",
    })
    paths = [str(ROOT)]
    if tool == "trl" and workload == "ppo":
        paths.insert(0, str(TRL_PPO_PATH))
        # TRL 1.12's PPOTrainer builds its own Accelerator, which reads the precision from
        # here (transformers 5 no longer exports bf16=True to it).
        env["ACCELERATE_MIXED_PRECISION"] = "bf16" if precision == "bf16" else "no"
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_worker(tool: str, workload: str, model: str, spec: dict, threads: int, timeout: int, log_dir: Path) -> dict:
    """One worker process; returns its BENCH result, or {"error": ...} with the log's tail."""
    script = BENCH / "workers" / f"{tool}_{workload}.py"
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-{workload}-", dir=WORK) as tmp:
        spec = {**spec, "tool": tool, "workload": workload, "model": model, "work_dir": tmp}
        spec_path = Path(tmp) / "spec.json"
        spec["launched"] = time.time()
        spec_path.write_text(json.dumps(spec))
        log = log_dir / f"{tool}_{workload}_{model}_{spec['repeat']}.log"
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, str(script), str(spec_path)], cwd=ROOT, timeout=timeout,
                                  env=worker_env(workload, tool, threads, spec["allocator"], spec["precision"]),
                                  capture_output=True,
                                  text=True)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            output = (err.stdout or b"").decode() + (err.stderr or b"").decode() if isinstance(err.stdout, bytes) \
                else (err.stdout or "") + (err.stderr or "")
            rc = f"timeout after {timeout} s"
        log.write_text(output)
    lines = [line for line in output.splitlines() if line.startswith("BENCH ")]
    if rc != 0 or not lines:
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        return {"tool": tool, "workload": workload, "model": model, "repeat": spec["repeat"],
                "error": f"exit {rc}: " + " | ".join(tail)[-400:], "log": str(log.relative_to(ROOT)),
                "wall_s": time.time() - start}
    return {**json.loads(lines[-1][6:]), "repeat": spec["repeat"], "wall_s": time.time() - start,
            "log": str(log.relative_to(ROOT))}


def landed(module: str) -> bool:
    """posttrain's trainer for a workload is committed (a file still being written does not count)."""
    path = module.replace(".", "/") + ".py"
    return subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=ROOT, capture_output=True).returncode == 0


def reward_model_folder(model: str, model_path: str, threads: int) -> str:
    """The PPO reward model and critic start both tools read: built once per model and reused."""
    folder = WORK / "models" / f"{model}-reward"
    if not (folder / "config.json").is_file():
        made = subprocess.run([sys.executable, str(BENCH / "workers" / "make_reward_model.py"), model_path,
                               str(folder)], cwd=ROOT, env=worker_env("rm", "posttrain", threads),
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"building the PPO reward model failed:\n{made.stdout}{made.stderr}")
    return str(folder)


def matmul_ceiling(threads: int, seconds: float, dtypes: str = "fp32,bf16") -> dict:
    env = worker_env("matmul", "posttrain", threads)
    out = subprocess.run([sys.executable, str(BENCH / "matmul.py"), "--seconds", str(seconds), "--dtypes", dtypes],
                         env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- summarising


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise_tool(runs: list[dict], workload: str, ceiling: float, precision: str = "bf16") -> dict:
    """One tool's figures over repeats; the FLOP rate as a share of the matmul ceiling of the run's
    precision (`fraction_of_bf16_ceiling` or `fraction_of_fp32_ceiling`)."""
    key = UNITS[workload][0]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"] if runs else "not run"}
    throughput = [r["counts_timed"][key] / sum(r["step_seconds"]) for r in ok]
    out = {
        "throughput": spread(throughput),
        "seconds_per_step": spread([statistics.median(r["step_seconds"]) for r in ok]),
        "peak_rss_gb": spread([r["peak_rss_bytes"] / 1e9 for r in ok]),
        "time_to_first_step_s": spread([r["time_to_first_step_s"] for r in ok]),
        "counts_timed": ok[0]["counts_timed"], "counts_total": ok[0]["counts_total"],
        "params": ok[0].get("params"), "failed_repeats": len(runs) - len(ok), "optimizer": ok[0].get("optimizer"),
        "autocast": ok[0].get("autocast"),
    }
    if workload in ROLLOUT:
        out["generated_tokens_per_s"] = spread([r["counts_timed"]["generated_tokens"] / sum(r["step_seconds"])
                                                for r in ok])
    if workload in FLOP_FACTOR and out["params"]:
        flops = [FLOP_FACTOR[workload] * r["params"] * r["counts_timed"]["tokens"] / sum(r["step_seconds"])
                 for r in ok]
        out["tflops"] = spread([f / 1e12 for f in flops])
        out[f"fraction_of_{precision}_ceiling"] = statistics.median(flops) / ceiling
    return out


def paired_ratio(runs: list[dict], workload: str, model: str) -> dict | None:
    """posttrain/TRL throughput within each repeat (the two ran back to back), over repeats:
    steadier than the ratio of medians when the machine's load drifts."""
    key = UNITS[workload][0]
    rate = {(r["tool"], r["repeat"]): r["counts_timed"][key] / sum(r["step_seconds"]) for r in runs
            if r["workload"] == workload and r["model"] == model and "error" not in r}
    ratios = [rate[("posttrain", k)] / rate[("trl", k)] for (tool, k) in rate if tool == "posttrain"
              and ("trl", k) in rate]
    return spread(ratios) if ratios else None


def count_check(workload: str, a: dict, b: dict) -> tuple[bool, str]:
    """Same work on both sides: the SAME_WORK counts agree within COUNT_TOLERANCE."""
    notes, ok = [], True
    for key in sorted(set(a["counts_total"]) | set(b["counts_total"])):
        x, y = a["counts_total"].get(key, "–"), b["counts_total"].get(key, "–")
        if key in SAME_WORK[workload]:
            same = x != "–" and y != "–" and abs(x - y) <= COUNT_TOLERANCE * max(x, y, 1)
            ok &= same
            notes.append(f"**{key}** {x}/{y}" + ("" if same else " ✗"))
        else:
            notes.append(f"{key} {x}/{y}")
    return ok, ", ".join(notes)


# ---------------------------------------------------------------- reporting


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1),
            "bf16_native": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")), "python": platform.python_version()}


def versions() -> dict:
    out = {name: md.version(name) for name in ("torch", "transformers", "accelerate", "peft", "datasets", "trl")}
    out["posttrain"] = md.version("posttrain")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out["posttrain_commit"] = head.stdout.strip()
    probe = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(TRL_PPO_PATH)})
    out["trl_ppo"] = probe.stdout.strip() or "missing (run benchmarks/setup.sh)"
    return out


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    if s["n"] == 1:
        return fmt(s["median"] * scale, digits)
    return f"{fmt(s['median'] * scale, digits)} ({fmt(s['min'] * scale, digits)}–{fmt(s['max'] * scale, digits)})"


def earlier_reports(exclude: Path | None = None) -> list[dict]:
    """Every run of this script under benchmarks/results, `<date>-full.json` and `<date>-quick.json`
    (rows not re-measured are carried from them; sampling.py's `sampling-*.json` are not runs of it)."""
    paths = sorted(p for mode in ("full", "quick", "profile") for p in (BENCH / "results").glob(f"*-{mode}.json"))
    return [json.loads(p.read_text()) for p in paths if exclude is None or p.resolve() != exclude.resolve()]


def row_rank(report: dict, row: dict) -> tuple:
    """Which run's figures a row of RESULTS.md shows: both tools ran > full mode > newer."""
    both = "error" not in row["posttrain"] and "error" not in row["trl"]
    return both, not report["meta"]["quick"], report["meta"]["date"]


def pick_rows(reports: list[dict]) -> list[tuple[int, dict]]:
    """(run index, row) for every (workload, model) seen in any run, its best run's row."""
    best: dict[tuple[str, str], tuple[tuple, int, dict]] = {}
    for k, report in enumerate(reports):
        if report["meta"].get("profile"):
            continue  # the hooks of a profiled run cost time of their own: its rates are not comparable
        for row in report["rows"]:
            key = (row["workload"], row["model"])
            rank = row_rank(report, row)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, k, row)
    order = [(w, m) for w in UNITS for m in MODELS]
    return [(best[key][1], best[key][2]) for key in order if key in best]


def markdown(reports: list[dict], fp32: list[dict] | None = None) -> str:
    """RESULTS.md from one or more bf16 runs (rows carried over from the runs that measured them) and the
    fp32 runs' section (default: every results/*-fp32.json)."""
    rows = pick_rows(reports)
    used = sorted({k for k, _ in rows}, key=lambda k: reports[k]["meta"]["date"])
    label = {k: f"R{i + 1}" for i, k in enumerate(used)}
    newest = reports[used[-1]]["meta"]
    v, m = newest["versions"], newest["machine"]
    lines = [
        "# posttrain vs TRL — benchmark results",
        "",
        "Made by `benchmarks/run.py` (see the README's Development section). Each row shows the run that "
        "measured it (R1, R2, … below); QUICK runs are harness checks with few steps and 1 repeat, not "
        "measurements.",
        "",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, native bf16: {m['bf16_native']}; "
        f"{newest['threads']} threads for every run.",
        f"- **Versions**: posttrain {v['posttrain']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}, peft {v['peft']}, datasets {v['datasets']}, "
        f"TRL {v['trl']} (SFT, RM, DPO, GRPO, RLOO), TRL {v['trl_ppo']} (PPO), Python {m['python']}.",
        "- **Same work**: identical token ids in the same order on both sides (posttrain's tokenizer, chat "
        "template and data order; TRL reads them pre-tokenised with a sequential sampler; GRPO and RLOO: TRL "
        "renders posttrain's prompt conversations with the same chat template and the worker checks that it "
        "generates from the same ids); bf16 autocast over "
        "fp32 weights on both; gradient checkpointing off on both; AdamW, constant lr, clip 1.0; "
        "the same allocator (each run's line names it) and thread count for both.",
        "- **Repeats**: tools alternate (posttrain, TRL, posttrain, TRL, …); figures are median (min–max) over "
        "repeats; each repeat's throughput excludes its warm-up steps. The ratio column gives the ratio of the "
        "medians and, with several repeats, the median (min–max) of the per-repeat ratios (`paired`: each "
        "repeat's posttrain and TRL runs were back to back, so slow drifts of the machine's load cancel).",
        "",
        "Runs:",
        "",
    ]
    for k in used:
        meta, mm = reports[k]["meta"], reports[k]["matmul"]
        mode = "QUICK" if meta["quick"] else "full"
        lines.append(f"- **{label[k]}** {meta['date']}, {mode}, {meta['repeats']} repeat(s), posttrain "
                     f"{meta['versions']['posttrain_commit']}: `{meta['command']}`; matmul ceiling "
                     f"({mm['start']['n']}³ GEMM, higher of before/after) fp32 {mm['ceiling_fp32'] / 1e9:.0f}, "
                     f"bf16 {mm['ceiling_bf16'] / 1e9:.0f} GFLOP/s; allocator for both tools: "
                     f"{ALLOCATOR_WORDS[meta.get('allocator', 'glibc')]}." + (f" {meta['note']}" if meta.get("note") else ""))
    if any(reports[k]["meta"].get("note") for k in used):
        lines += ["", "**Read the runs' notes before the ratios**: a run measured on a loaded machine gives "
                  "noisy figures, and rows from different runs were measured under different loads."]
    lines += ["", "## Throughput", "",
              "| workload | model | per step | run | posttrain | TRL | posttrain / TRL | target |",
              "|---|---|---|---|---|---|---|---|"]
    for k, row in rows:
        unit = UNITS[row["workload"]][1]
        pt, trl = row["posttrain"], row["trl"]
        both = "error" not in pt and "error" not in trl
        ratio = f"**{pt['throughput']['median'] / trl['throughput']['median']:.2f}×**" if both else "—"
        paired = paired_ratio(reports[k]["runs"], row["workload"], row["model"])
        if both and paired and paired["n"] > 1:
            ratio += f"; paired {paired['median']:.2f}× ({paired['min']:.2f}–{paired['max']:.2f})"
        lines.append(f"| {row['workload']} | {row['model']} | {row['per_step']} | {label[k]} | "
                     f"{_cell(pt, 'throughput', unit)} | {_cell(trl, 'throughput', unit)} | {ratio} "
                     f"| ≥ {TARGET_SPEEDUP[row['workload']]}× |")
        if row["workload"] in ROLLOUT and both:
            g = pt["generated_tokens_per_s"]["median"] / trl["generated_tokens_per_s"]["median"]
            lines.append(f"| {row['workload']} | {row['model']} | generated tokens | {label[k]} | "
                         f"{fmt_spread(pt['generated_tokens_per_s'])} tok/s "
                         f"| {fmt_spread(trl['generated_tokens_per_s'])} tok/s | {g:.2f}× | |")
    lines += ["", "## Memory, start-up and FLOP rate", "",
              f"FLOP rate as a share of the bf16 matmul ceiling measured in the same run (target ≥ "
              f"{TARGET_CEILING:.0%} for training steps).", "",
              f"| workload | model | run | peak RSS posttrain | peak RSS TRL | ratio (target ≤ {TARGET_RSS}) "
              "| time to first step posttrain | TRL | posttrain TFLOP/s (% bf16 ceiling) | TRL TFLOP/s (% bf16 ceiling) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k, row in rows:
        pt, trl = row["posttrain"], row["trl"]
        both = "error" not in pt and "error" not in trl
        rss = f"{pt['peak_rss_gb']['median'] / trl['peak_rss_gb']['median']:.2f}" if both else "—"
        lines.append(f"| {row['workload']} | {row['model']} | {label[k]} | {_cell(pt, 'peak_rss_gb', 'GB')} | "
                     f"{_cell(trl, 'peak_rss_gb', 'GB')} | {rss} | {_cell(pt, 'time_to_first_step_s', 's')} | "
                     f"{_cell(trl, 'time_to_first_step_s', 's')} | {_flops(pt)} | {_flops(trl)} |")
    lines += fp32_runs.section(fp32_runs.reports() if fp32 is None else fp32)
    lines += profile_section(reports)
    lines += targets.targets_section([row for _, row in rows], targets.newest_profiles(reports), TARGET_SPEEDUP,
                                     TARGET_RSS)
    lines += targets.step_ops_section()
    lines += targets.levers_section()
    lines += ["", "## Same work check", "",
              "Counts over all steps each side ran, posttrain/TRL, from the batches each tool built. Bold counts "
              "define the work and must agree (✗: more than 2 % apart); the others show what each tool fed its "
              "model (`computed_tokens`: real tokens in its layout; `padded_tokens`: including padding) and may "
              "differ by design. `tokens` counts real tokens of the sequences as laid out one per row "
              "(DPO: prompt+chosen and prompt+rejected).", "",
              "bf16 autocast as seen by a hook on the policy's first Linear layer: training forwards / no-grad "
              "forwards (generation, reference, scoring); `none`: no such forward went through that layer (TRL's "
              "reference and reward models are separate objects; posttrain's DPO reference is a copy of the "
              "policy, hook included; posttrain's GRPO/RLOO reference is a copy made before the hook, and its "
              "sampler decodes from its own bf16 copy of the weights).", "",
              "| workload | model | run | counts | equal | autocast posttrain | autocast TRL |",
              "|---|---|---|---|---|---|---|"]
    for k, row in rows:
        equal = "yes" if row.get("counts_equal") else ("**NO**" if "counts_equal" in row else "—")
        lines.append(f"| {row['workload']} | {row['model']} | {label[k]} | {row.get('count_check', '—')} | {equal} "
                     f"| {_autocast(row['posttrain'])} | {_autocast(row['trl'])} |")
    lines += ["", "## How it is measured", "", METHOD.strip(), "", "## Notes", ""]
    lines += [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def profile_section(reports: list[dict]) -> list[str]:
    """Where the time and memory go, from the newest `--profile` run of each (workload, model)."""
    from breakdown import CATEGORIES, MEMORY

    newest = targets.newest_profiles(reports)
    if not newest:
        return []
    lines = ["", "## Where the time and memory go", "",
             "From `run.py --profile` (hooks described in `benchmarks/breakdown.py`; they slow the run, so these "
             "runs give shares, not the rates above). Time: share of the timed steps' wall time, median over "
             "repeats. Memory: GB at the peak (VmHWM at the last step), split at the end of the warm-up; `rest` "
             "is the peak minus everything tensors account for (allocator slack, transient buffers); it can be "
             "negative because the parts are not all alive at one moment (backward frees activations as it "
             "makes gradients).", "",
             "| workload | model | tool | s/step | " + " | ".join(CATEGORIES) + " | peak GB | "
             + " | ".join(MEMORY) + " |",
             "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|" + "---|" * len(MEMORY)]
    for (workload, model), (meta, runs) in sorted(newest.items(), key=lambda kv: (list(UNITS).index(kv[0][0]),
                                                                                    kv[0][1])):
        for tool in TOOLS:
            mine = [r for r in runs if r["tool"] == tool]
            if not mine:
                continue
            step = statistics.median(statistics.mean(r["step_seconds"]) for r in mine)
            shares, parts = targets.shares(runs, tool), targets.memory(runs, tool)
            peak = statistics.median(r["peak_rss_bytes"] for r in mine) / 1e9
            lines.append(f"| {workload} | {model} | {tool} | {step:.2f} | "
                         + " | ".join(f"{100 * shares[c]:.0f} %" for c in CATEGORIES) + f" | {peak:.2f} | "
                         + " | ".join(f"{parts[m]:.2f}" for m in MEMORY) + " |")
    dates = sorted({meta["date"] for meta, _ in newest.values()})
    lines += ["", f"Profiled: {', '.join(dates)}."]
    return lines


def _cell(side: dict, key: str, unit: str) -> str:
    if "error" in side:
        return side["error_short"]
    return f"{fmt_spread(side[key])} {unit}"


def _autocast(side: dict) -> str:
    seen = side.get("autocast")
    if not seen:
        return "—"
    word = {(True,): "on", (False,): "off", (False, True): "mixed"}
    return " / ".join(word[tuple(seen[key])] if key in seen else "none" for key in ("grad", "no_grad"))


def _flops(side: dict) -> str:
    if "error" in side or "tflops" not in side:
        return "—"
    return f"{fmt_spread(side['tflops'], digits=2)} ({100 * side['fraction_of_bf16_ceiling']:.0f} %)"


METHOD = """
- Every (tool, workload, model, repeat) is a separate process (`benchmarks/workers/<tool>_<workload>.py`)
  that runs warm-up + timed + 1 optimizer steps (PPO: iterations) and prints one JSON line.
- **Step time**: wall time between the starts of consecutive steps, so it covers everything a tool does per
  step. TRL 1.16: a `TrainerCallback`'s `on_step_begin`. TRL 1.12 PPO (no `on_step_begin`): `on_train_begin`
  and every `on_step_end`. posttrain has no callbacks, so the worker wraps the module-level function its loop
  calls first in each step: `collate` (SFT), `pair_rewards` (RM), `PairSet.batch` (DPO), `generate` (PPO; the
  last iteration is closed after its `ppo_epochs`, before the final save), `grpo.generate` (GRPO, RLOO; TRL's
  `on_step_begin` comes once per optimizer step, before the generation in its first micro-batch). Warm-up steps
  are dropped; throughput = work in the timed steps / their summed time.
- **Work counted** from the batches each tool really used (TRL: the inputs of each `compute_loss` call, PPO:
  the output of `batch_generation`, GRPO/RLOO: the prompt and completion ids of each `_generate_single_turn`
  call; posttrain: the batch its loop built, PPO/GRPO/RLOO: the `Generation` its `generate` returned):
  rows/pairs/episodes, real tokens, tokens including padding, loss tokens, prompt tokens (one prompt per
  episode), generated tokens (up to and including EOS).
- **Peak RSS**: the process's VmHWM at the start of its last step, i.e. after all earlier steps ran in full,
  before posttrain saves its final model (TRL saves nothing); the at-exit `ru_maxrss` is in the JSON too.
- **Time to first step**: from just before the orchestrator starts the process to the start of step 2
  (imports, model and data loading, tokenising, the first step).
- **FLOP rate**: 6·N·T per training step (N = distinct parameters, tied embeddings once; T = real tokens of
  the sequences laid out one per row); DPO adds 2·N·T for the reference forward. This is the nominal model
  FLOP count: attention's T² term is left out, and posttrain's LM head (loss positions only) and DPO prefix
  sharing (each prompt once) do less than this, so it is a model-FLOPs utilisation, not a count of the
  arithmetic each tool performed. PPO, GRPO and RLOO mix generation, scoring and training; no FLOP rate is given
  for them.
- **Workloads**: SFT — 4 rows of exactly 256 tokens (records of joined example completions, cut to 256),
  loss on completion tokens. RM and DPO — the 80 pairs of `examples/data/preferences.jsonl`, 4 a step,
  chosen and rejected padded together (DPO: sigmoid loss, β = 0.1, a frozen fp32 reference). PPO — 4 prompts
  of `examples/data/prompts.jsonl` a step, responses sampled at temperature 1 up to 32 tokens or EOS, scored
  by a reward model (the LM with a fresh seeded scalar head, built once by posttrain's `RewardModel` and read
  by both tools; it is also the critic's start), KL β = 0.05, 4 PPO epochs of 1 minibatch. GRPO and RLOO — 4
  prompts of `examples/data/prompts.jsonl` a step (≤ 64 tokens), K = 4 responses each sampled at temperature 1
  (no top-k, top-p 1) up to 32 tokens or EOS, scored by the same Python function on both sides
  (`bench.lowercase_share`: the share of a response's characters that are lowercase letters; no reward model),
  micro-batches of 4 responses accumulated into one optimizer step per generation batch (μ = 1, clip ε 0.2,
  lr 1e-6). GRPO: advantages (r − group mean) / group std, β = 0.04 with a frozen fp32 reference and the k3 KL
  per token in the loss (TRL: `use_bias_correction_kl=False`, i.e. the same plain k3), each response's token
  mean then the mean over responses (`loss_type="grpo"` on both); neither needs log π_old at μ = 1 (the ratio is
  taken against the detached current log-probs). RLOO: each side's defaults with β = 0.05 — both compute log
  π_old and log π_ref (TRL: a no-grad forward of each; posttrain, since commit 70c0b8f: log π_old from the training
  forward itself, whose weights have not moved since sampling at μ = 1, so one no-grad forward), subtract
  β · Σ_t (log π_old − log π_ref) (k1, summed over the response) from the reward, and use the leave-one-out baseline without std scaling; posttrain clips the ratio per
  token and reduces `dr_grpo` (token sum / (responses · 32)), TRL clips one ratio per response (the exp of its
  summed token log-ratios) and averages over responses: at μ = 1 both gradients are A · Σ_t ∇log π_t per
  response averaged over responses, posttrain's further divided by 32.
"""


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and 1 repeat: checks the harness")
    parser.add_argument("--workloads", default=",".join(UNITS))
    parser.add_argument("--models", default=None, help="default smollm2,tiny (tiny with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per worker process")
    parser.add_argument("--json", default=None, help="default benchmarks/results/<date>.json")
    parser.add_argument("--markdown", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--uncommitted", action="store_true",
                        help="also run posttrain trainers not committed yet (for work on the harness)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default=None,
                        help="for both tools: glibc with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184, "
                             "or tcmalloc preloaded (as scripts/demo.sh); default glibc")
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. machine was shared)")
    parser.add_argument("--profile", action="store_true",
                        help="hook every worker to split its step time and peak memory (benchmarks/breakdown.py); "
                             "its rates stay out of the throughput table")
    parser.add_argument("--trl-attention", choices=("sdpa", "eager"), default="eager",
                        help="attn_implementation TRL's models are loaded with; default eager, TRL's faster one on "
                             "every workload here (benchmarks/trl_attention.py); posttrain picks per row length")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="both tools' training precision: bf16 autocast over fp32 weights (the tables' runs), "
                             "or fp32 for a CPU without native bf16; fp32 runs go to results/<date>-fp32.json "
                             "and a section of their own (benchmarks/fp32_runs.py)")
    parser.add_argument("--compile", action="store_true",
                        help="compile both tools' models: posttrain's --compile (each decoder layer) and TRL's "
                             "torch_compile=True (the whole model, through accelerate); not for ppo, whose TRL 1.12 "
                             "trainer has no such setting")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the Markdown from benchmarks/results/*.json")
    args = parser.parse_args()
    for flag, value in (("--markdown", args.markdown), ("--json", args.json)):
        if value and (Path(value).is_dir() or not Path(value).resolve().parent.is_dir()):
            parser.error(f"{flag} {value}: not a file in an existing folder")
    if args.report_only and args.allocator:
        parser.error("--allocator: a run's setting; --report-only runs nothing")
    args.allocator = args.allocator or "glibc"
    if args.report_only:
        Path(args.markdown).write_text(markdown(earlier_reports()))
        print(f"wrote {args.markdown}")
        return
    workloads = args.workloads.split(",")
    models = (args.models or ("tiny" if args.quick else "smollm2,tiny")).split(",")
    for w in workloads:
        if w not in UNITS:
            parser.error(f"--workloads: unknown {w!r}; choose from {', '.join(UNITS)}")
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown {m!r}; choose from {', '.join(MODELS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    mode = "quick" if args.quick else "full"
    if args.allocator == "tcmalloc" and not Path(TCMALLOC).is_file():
        parser.error(f"--allocator tcmalloc: {TCMALLOC} is missing (apt install libtcmalloc-minimal4)")
    if args.precision == "fp32" and args.profile:
        parser.error("--profile: the profile tables are of bf16 runs; leave out --precision fp32")
    if args.compile and "ppo" in workloads:
        parser.error("--compile: TRL 1.12's PPOTrainer has no torch_compile; leave ppo out of --workloads")
    if args.profile and args.quick:
        parser.error("--profile measures the full runs' steps; leave out --quick")
    subprocess.run(["bash", str(BENCH / "setup.sh")], cwd=ROOT, check=True)
    now = dt.datetime.now()
    WORK.mkdir(exist_ok=True)
    log_dir = WORK / "logs" / now.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True)
    data = write_data(WORK / "data")

    from posttrain.models import resolve_model_path
    paths = {m: resolve_model_path(MODELS[m]) for m in models}
    available = {w: args.uncommitted or landed(POSTTRAIN_MODULES[w]) for w in workloads}
    reward_models = {m: reward_model_folder(m, paths[m], args.threads) for m in models} if "ppo" in workloads else {}

    # An fp32 run's table needs the fp32 ceiling only (bf16 GEMMs crawl on a CPU without native bf16).
    ceilings = "fp32" if args.precision == "fp32" else "fp32,bf16"
    print(f"matmul ceiling ({args.threads} threads)…", flush=True)
    mm_start = matmul_ceiling(args.threads, 2.0 if args.quick else 4.0, ceilings)
    rows = [(w, m) for w in workloads for m in models]
    runs: list[dict] = []
    for repeat in range(repeats):
        for workload, model in rows:
            s = SETTINGS[(workload, model)]
            warmup, timed = s[mode]
            spec = {k: v for k, v in s.items() if k not in ("full", "quick")}
            spec.update(model_path=paths[model], warmup=warmup, timed=timed, repeat=repeat, seed=0,
                        precision=args.precision, compile=args.compile, gradient_checkpointing=False,
                        profile=args.profile,
                        allocator=args.allocator, trl_attention=args.trl_attention,
                        data=str(data[DATA[workload]]),
                        reward_model=reward_models.get(model, ""))
            for tool in TOOLS:
                if tool == "posttrain" and not available[workload]:
                    continue
                print(f"[{repeat + 1}/{repeats}] {workload} {model} {tool}…", end=" ", flush=True)
                result = run_worker(tool, workload, model, spec, args.threads, args.timeout, log_dir)
                runs.append(result)
                if "error" in result:
                    print(f"FAILED ({result['error'][:200]}; log {result['log']})", flush=True)
                else:
                    key, unit = UNITS[workload]
                    rate = result["counts_timed"][key] / sum(result["step_seconds"])
                    print(f"{rate:.4g} {unit}, {statistics.median(result['step_seconds']):.3g} s/step, "
                          f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, counts {result['counts_total']}",
                          flush=True)
    mm_end = matmul_ceiling(args.threads, 2.0 if args.quick else 4.0, ceilings)
    ceiling = {name: max(mm_start[name]["flops_per_s"], mm_end[name]["flops_per_s"]) if name in mm_start else None
               for name in ("fp32", "bf16")}

    summary = []
    for workload, model in rows:
        s = SETTINGS[(workload, model)]
        per_step = (f"{s['batch_size']} × {s['max_length']} tok" if workload == "sft" else
                    f"{s['batch_size']} pairs ≤ {s['max_length']} tok" if workload in ("rm", "dpo") else
                    f"{s['batch_size']} × {s['response_length']}-tok rollouts" if workload == "ppo" else
                    f"{s['prompts']} prompts × {s['num_generations']} × ≤ {s['response_length']} tok")
        row = {"workload": workload, "model": model, "per_step": per_step}
        for tool in TOOLS:
            mine = [r for r in runs if r["tool"] == tool and r["workload"] == workload and r["model"] == model]
            if tool == "posttrain" and not available[workload]:
                side = {"error": f"{POSTTRAIN_MODULES[workload]} not there yet", "error_short": "not in posttrain yet"}
            else:
                side = summarise_tool(mine, workload, ceiling[args.precision], args.precision)
                if "error" in side:
                    last = side["error"].split(" | ")[-1].strip().replace("|", "/")
                    side["error_short"] = f"failed ({last[:100]})"
            row[tool] = side
        if "error" not in row["posttrain"] and "error" not in row["trl"]:
            row["counts_equal"], row["count_check"] = count_check(workload, row["posttrain"], row["trl"])
            row["paired_ratio"] = paired_ratio(runs, workload, model)
        summary.append(row)

    command = "python benchmarks/run.py " + shlex.join(sys.argv[1:])
    report = {
        "meta": {"date": now.strftime("%Y-%m-%d %H:%M"), "command": command.strip(), "quick": args.quick,
                 "profile": args.profile, "allocator": args.allocator, "precision": args.precision,
                 "compile": args.compile,
                 "repeats": repeats, "threads": args.threads, "machine": machine(), "versions": versions(),
                 "settings": {f"{w}/{m}": SETTINGS[(w, m)] for w, m in rows}, "note": args.note,
                 "logs": str(log_dir.relative_to(ROOT))},
        "matmul": {"start": mm_start, "end": mm_end, "ceiling_fp32": ceiling["fp32"], "ceiling_bf16": ceiling["bf16"]},
        "rows": summary, "runs": runs,
    }
    kind = "profile" if args.profile else mode + ("-fp32" if args.precision == "fp32" else "")
    out = Path(args.json) if args.json else BENCH / "results" / f"{now.strftime('%Y-%m-%d-%H%M')}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if args.precision == "fp32":
        text = markdown(earlier_reports(), fp32_runs.reports(out) + [report])
    else:
        text = markdown(earlier_reports(out) + [report])
    Path(args.markdown).write_text(text)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {args.markdown}")
    for row in summary:
        pt, trl = row["posttrain"], row["trl"]
        if "error" in pt or "error" in trl:
            print(f"{row['workload']:4s} {row['model']:8s} posttrain: {pt.get('error_short', 'ok')}; "
                  f"TRL: {trl.get('error_short', 'ok')}")
            continue
        print(f"{row['workload']:4s} {row['model']:8s} posttrain/TRL throughput "
              f"{pt['throughput']['median'] / trl['throughput']['median']:.2f}×, peak RSS "
              f"{pt['peak_rss_gb']['median'] / trl['peak_rss_gb']['median']:.2f}×, counts equal: {row['counts_equal']}")


NOTES = [
    "Allocator probe (results/allocator-probe-2026-11-30-1025.json, `--allocator tcmalloc`, 1 repeat, not in the "
    "tables): with tcmalloc for both tools, PPO ran 0.329 / 0.278 episodes/s (1.18×), GRPO 2.21 / 1.47 (1.50×), "
    "RLOO 1.95 / 1.25 (1.56×), peak RSS 6.36 / 6.51, 4.46 / 4.43 and 4.46 / 4.39 GB: the ratios move within "
    "the run-to-run spread, and both tools' PPO peak falls by 0.6–0.7 GB. (Under torch.profiler, glibc's "
    "settings made each zero-fill of the 49152 × 576 embedding gradient take 88 ms against 13 ms under "
    "tcmalloc; the unprofiled PPO step did not show that difference.)",
    "Padding-free passes (results/2026-11-30-1213-full.json: RM, PPO, GRPO, RLOO rerun after them): posttrain "
    "now runs a padded batch with at least 1/8 padding as one row of its real tokens, attention within each "
    "sequence (`posttrain/models/attention.py`). The RM's batches (24.5 % padding) gain it: in a standalone A/B of "
    "the RM trainer (2 runs each) the step fell from 3.30–3.48 s to 2.75–2.84 s, but in that run the RM ratio stayed "
    "within the spread (paired 1.03×, 1.01–1.16, against R1's 1.08×, 1.02–1.11) while its peak fell 0.15 GB "
    "(ratio 0.97). Rollouts carry little padding (2.5 % in the PPO iteration profiled), so PPO, GRPO and RLOO mostly keep the padded "
    "path; their ratios in that run were R1's within the spread.",
    "Later levers (R2: RM, DPO, GRPO; R3: PPO, RLOO, with all of them): "
    "(1) prefix-shared DPO pairs are packed too (real tokens only, the prompt still once; attention over the pair "
    "rows under the sequences' mask): on the benchmark's 9 DPO batches (10–28 % padding) policy forward + backward "
    "and a no-grad forward took 0.89× the padded time, every batch faster. (2) RLOO at μ = 1 with one minibatch "
    "takes log π_old from its training forward (same weights as at sampling), skipping one no-grad forward of "
    "every response: 1.62× in a run before the math backend (results/2026-11-30-1403-full.json) against 1.30× in the 12:13 run. (3) Rows of at most 192 tokens attend through SDPA's math "
    "backend instead of flash: alone, at SmolLM2's attention shapes, math took 0.62–0.89× flash's forward + "
    "backward up to 192 tokens (1.02× at 256, 2.0× at 512); the RM pass fell from 0.87× to 0.78× of the padded "
    "one, the DPO pass from 0.89× to 0.84×. Its price is memory (fp32 scores and probabilities kept for the "
    "backward): +0.23–0.25 GB for a forward + backward of 4 × 110, seen in R2's peaks (RM 3.80 against 3.64 "
    "GB in the 12:13 run, GRPO 4.98 against 4.66). The floors (`gemm_floor.py`) now count real tokens, and RLOO's no log π_old "
    "pass; with them the RM row is open rather than marginal.",
    "Eager attention, both sides (results/2026-11-30-1656-full.json, every SmolLM2 row rerun): posttrain's rows of "
    "at most 192 tokens attend by two bf16 matrix products and an fp32 softmax without copying the key/value heads "
    "(`eager_attention`) instead of SDPA's math backend (which had replaced flash for them in the runs of 14:35 "
    "and 15:41). Alone, at SmolLM2's attention shapes (forward + backward, 2 threads), it took 0.2–0.5× flash's "
    "time at 8 × 64–192 tokens, 0.75× at 4 × 256–320, 1.0× at 4 × 384, and 2–2.5× less than math's, keeping "
    "6.9 MB a layer for the backward at 8 × 110 against math's 13.1 and flash's 2.7. In one-repeat checks run "
    "back to back, posttrain's RM step went 1.91 → 1.71–1.74 s and DPO's 2.52 → 2.09–2.13 s. But transformers' "
    "own eager attention, which TRL loads with `attn_implementation=\"eager\"`, gains TRL as much: "
    "`benchmarks/trl_attention.py` (results/trl-attention-2026-11-30-1636.json; RM and DPO from two one-repeat "
    "run.py checks) timed TRL's step with sdpa → eager at SFT 4.12 → 3.83 s, GRPO 11.34 → 10.68, RLOO 12.58 → "
    "11.86, PPO 14.75 → 13.79, RM 2.35 → 1.95, DPO 4.30 → 3.75. The comparison's rules give TRL its best "
    "setting, so from this run TRL loads eager attention (`run.py --trl-attention`, default eager); every earlier "
    "run compared against TRL with sdpa, and its ratios are higher than they would have been. TRL's peaks with "
    "eager: SFT 5.87 against 5.32 GB with sdpa; RM, PPO, GRPO, RLOO 0.07–0.17 GB higher; DPO 0.35 GB lower. So the memory "
    "rows judged against TRL's eager peak flatter posttrain where eager costs TRL memory: SFT's row reads open, "
    "but against TRL's sdpa peak (5.32 GB) its target is 3.19 GB, below the 3.28 GB alive at the forward's end: "
    "out of reach, as before.",
    "Levers of R3 (posttrain 0f7eefd; TRL unchanged, eager attention), each measured paired in one process "
    "(variants alternating over the benchmark's pairs, 3 passes, glibc or tcmalloc alike), bit for bit the same "
    "results unless said: (1) the packed rows of `varlen_sdpa_attention` gathered and put back by autograd "
    "functions whose backward gathers (every token has one place, padding gets no gradient) instead of autograd's "
    "accumulating scatter (`index_put_`, 0.045 s of a profiled RM step): 0.034 s less an RM forward + backward, "
    "0.011–0.013 s a DPO step; (2) the chunked LM head keeps its bf16 logits (≤ 128 MiB) and its cast weight for "
    "the backward instead of recomputing them: 0.047–0.058 s a DPO step, +36 MB of logits and +57 MB of head "
    "between forward and backward; (3) the frozen reference's head, tied to its fp32 embedding, gets a bf16 copy "
    "of its own (57 MB) instead of a cast every forward: 0.007–0.013 s; (4) the reward model computes the "
    "decoder's last layer at the read tokens only (keys and values of all, queries, MLP and norm of the 8 read): "
    "0.037–0.039 s an RM step, states and gradients equal to the whole pass's within fp32 rounding (tested). "
    "A run at 7fc1a3a, with (1)–(3) (results/2026-11-30-2040-full.json, 3 repeats), gave RM 1.54× (paired 1.63×, "
    "1.31–1.74) and DPO 1.70× (paired 1.78×, 1.68–1.88), posttrain's DPO step 2.19–2.70 s against 2.06 s in R2 "
    "(4ae0aef): that hour the machine ran bf16 GEMMs of SmolLM2's shapes and 1024³ at 330–400 GFLOP/s, against "
    "411–429 for the runs' 2048³ ceiling, and the trainer alone, old and new code alternating under glibc, took 2.82/3.35 s (old) against "
    "2.45/3.18 s (new) a step. Tried and dropped: clipping folded into fused AdamW's grad_scale (one pass fewer over "
    "the gradients) ran 0.094 s against 0.083 s for clip + step over SmolLM2's parameters.",
    "Levers of results/2026-11-30-2331-full.json (posttrain 5f7e71f; GRPO and RLOO; TRL unchanged, eager attention): (1) prefix sharing (commit cdea84b, "
    "`prefix_sharing`, default on): the responses to one prompt in a micro-batch go through the model as one "
    "row, the prompt computed once, each response attending to the prompt and itself (DPO's pair layout for K "
    "replies); with one minibatch, micro-batches take whole groups. Paired in one process on 4 SmolLM2 groups "
    "(4 responses of ≤ 32 tokens to prompts of 30–64, bf16 autocast, 2 threads, alternating, 3 passes): a "
    "training micro-batch's forward + backward 0.65–0.98 s against 0.92–1.34 s a row a response, a no-grad "
    "forward 0.26–0.29 s against 0.34–0.36 s; log-probs and gradients equal within fp32 rounding (tested). A run "
    "with (1) alone (results/2026-11-30-2307-full.json, cdea84b, 3 repeats) gave GRPO 1.87× (paired 1.86×, "
    "1.77–1.96), posttrain 5.76–5.95 s a step against 6.57 s in R2, and RLOO 2.30× (paired 2.18×, 2.08–2.47). "
    "(2) The no-grad forwards of stage 3 (reference, log π_old) take 4 micro-batches at once (commit 5f7e71f): "
    "paired, the reference pass over the same 4 groups took 0.78–0.84 s against 0.97–1.03 s. In that run (with both) "
    "GRPO gave 1.92× (paired 1.90×, 1.74–2.25) and RLOO 2.17× (paired 2.10×, 1.95–2.30): within the spread of the "
    "2307 run, on a slower hour (TRL's GRPO step 12.1–12.7 s against 10.6–11.3 s at 23:07), so (2)'s gain does "
    "not show above the noise; posttrain's GRPO peaks were 4.85–5.50 GB against 4.74–4.99 GB. The profile of "
    "23:52 (1 repeat) puts generation at 28 % of posttrain's GRPO step (1.78 s of the 6.44 s in 'What is left'): "
    "the sampler decodes at 25–30 % of its memory-bandwidth roofline (SAMPLING.md).",
    "Levers of R4 (results/2026-12-01-0333-full.json, posttrain 686e32f; its note calls them 'R5 levers', counting the runs made, where the labels here count the runs shown), each measured paired in one process (SmolLM2, bf16, 2 threads, glibc settings as in the runs): (1) the sampler's sync casts each weight into its stacked inference copy (no fp32 concatenation), packs a tied head from the embedding's copy and drops the old copy first: 95 ms against 123 ms a sync (median of 8), five syncs raising the peak RSS by 4 MB against 162 MB; (2) choose_tokens inverts the unnormalised CDF (one exponentiation a step, no division at temperature 1): 1.0 ms against 1.55 ms a step for 16 rows; (3) one autocast cast of the Linear weights per optimizer step instead of one per micro-batch (weights_cast_once): the forwards of micro-batches 2–4 of a GRPO step took 0.835 s against 0.897 s (median of 30), gradients bit-identical (tested). Together about 0.1 s of a 6.4 s step, below the run-to-run spread: R4 gave GRPO 1.93× (paired 1.83×, 1.83–2.00) and RLOO 2.07× (paired 2.07×, 1.81–2.46), against 1.92× and 2.17× in the 23:31 run. (4) top-p by candidates (the 256 most likely tokens by topk, a row sorted whole only when its nucleus may reach past them) does not act here (top_p 1); at top_p 0.9, 16 SmolLM2 rows × 32 tokens took 1.65 s against 2.24 s at temperature 1. Looked at and left: the decode step at batch 16 takes 35–50 ms, 20–23 ms of it oneDNN's packed matmuls (40–58 % of the bf16 ceiling at M = 16) and the rest ~25 small ops a layer (attention's batched products alone 0.12 ms a layer); oneDNN's fused post-ops (residual add, SiLU·up) ran slower than the separate ops, and one thread for the small ops slower overall. The training micro-batches also pay a bf16 → fp32 cast and an add of every weight gradient (about 55 ms each); torch 2.13 has no CPU matmul writing fp32 from bf16 inputs (aten::mm.dtype is not registered for CPU), so that stays.",
    "R5 (results/2026-12-01-0550-full.json, posttrain 6ed6e21; DPO and PPO, last measured in R3 and R2): on a slower hour. Both tools' steps were 16–23 % longer than in R2/R3 (DPO posttrain 2.45 against 2.10 s, TRL 4.60 against 3.86 s; PPO posttrain 13.0 against 10.3 s, TRL 16.7 against 13.7 s) and the GEMM floors measured after the run 15–16 % higher (DPO 1.35 against 1.17 s, PPO 4.25 against 3.65 s). The ratios stayed within the spread: DPO 1.84× (paired 1.89×, 1.77–1.91) against 1.85× (paired 1.79×), PPO 1.29× (paired 1.30×, 1.22–1.38) against 1.35× (paired 1.34×, 1.26–1.35). Lever of this run, measured paired in one process: the chunked LM head's backward casts the first chunk's weight-gradient product into the [V, H] gradient instead of adding it to a zero-filled one (commit bea66fb; bit-identical gradients, tested): a backward of 128 SmolLM2 tokens took 63.6 against 77.1 ms, of 366 tokens 171 against 180 ms; one such backward a DPO step, four a PPO iteration, four a GRPO step, each about 10 ms of a 2–13 s step. Tried and left: torch.compile of each decoder layer (`layer.compile(dynamic=True)`, regional: one graph serves all 30 layers and every length) on the benchmark's DPO pairs (4 prefix-shared pairs, bf16 autocast, forward + backward + fused AdamW, 2 threads): median step 1.95 s against 2.26 s eager (−14 %), the first step 53.8 s with an empty inductor cache and 18.6 s with a warm one (dynamo traces again in every process). transformers' Trainer has the same setting (`torch_compile=True`), which the comparison's rules would give TRL too, where it gained 9–18 % at these shapes (levers table); and it costs 17 s (warm cache) to 52 s (cold) a process before the first step, which the 0.31 s a step saved at these shapes repays only after about 55 and 170 steps, once per trainer stage and per distinct no-grad pass. So it stays out of the default path; a `--compile` option for long runs is left for later.",
    "PPO, steady state, unprofiled (2 threads, this machine; measured before the math backend and eager attention, so before the rows now shown): generation 1.25–1.43 s, old log-probs, values and "
    "reference 0.96–1.12 s, the 4 PPO epochs of policy + critic 9.85–9.94 s an iteration (minor page faults 10–1,027 "
    "an iteration after the first, whose 1.19 M cost 7 s of system time). TRL's step is 15.3 s, so 2× needs "
    "7.6 s: the epochs alone exceed it, and they are the same passes TRL makes with the same kernels (profile: "
    "forward + backward 10.7 s posttrain, 10.3 s TRL). Even torch.compile's best measured gain at this shape "
    "(−18 %, levers below) leaves them at 8.1 s. Under torch.profiler the epochs' `mm` ran 1.9 ms for "
    "[324,576]·[576,1536] against 1.43 ms alone (401 GFLOP/s), and the flash-attention backward 6.1 ms a call "
    "at 4 × 9 heads × 81 tokens.",
    "Optimizer implementations: TRL (transformers with torch ≥ 2.8) uses `adamw_torch_fused`; posttrain builds "
    "`torch.optim.AdamW(fused=True)` (since commit d8fa776, before R1). Both are the same fused AdamW kernel "
    "with the same hyper-parameters.",
    "TRL workers tokenise with posttrain's loader in their own process (so both see identical token ids; the time "
    "counts in TRL's time to first step) and hand TRL pre-tokenised data: TRL's own tokenising path is not "
    "exercised. TRL 1.16's DPOTrainer has no pre-tokenised path, so its `_prepare_dataset` is replaced by the "
    "identity; its collator still truncates and pads as usual.",
    "DPO and (since results/2026-11-30-1823-full.json or later) RM: posttrain's default lays a pair out as one prefix-shared row (the "
    "prompt computed once); TRL feeds prompt+chosen and prompt+rejected as two rows. That saving is part of posttrain's speed, not a difference "
    "in the work: pairs, reply tokens and the tokens of the two sequences are checked equal.",
    "PPO: responses are sampled, so the two tools' sampled lengths differ by chance (and EOS is frequent for the "
    "random tiny model); generated tokens/s is the fairer rate when the counts differ. TRL 1.12's PPO loader "
    "shuffles; the worker swaps in a sequential one so both tools see the same prompts each step. TRL 1.12's "
    "PPOTrainer builds its own Accelerator, which transformers 5 no longer tells about `bf16=True`, so the "
    "worker sets `ACCELERATE_MIXED_PRECISION=bf16`. Even so only its training forward (the prepared policy+value "
    "wrapper) runs under bf16 autocast: it samples with `unwrapped_model.policy.generate` (autocast checked off "
    "there) and only moves the reference and reward models to the device, so those run in fp32. posttrain "
    "samples under autocast and loads the reward model in bf16. This is how TRL 1.12 runs with bf16=True here, "
    "and it counts against TRL in the PPO row. In TRL's favour: its PPO loop never clips gradients (no "
    "`clip_grad_norm_` call; `max_grad_norm` is unused there), where posttrain clips at 1.0 over policy and "
    "critic; the profile's optimizer share (posttrain 8 %, TRL 3 % of the step) is mostly that.",
    "GRPO/RLOO: what differs in the work, by design or beyond the worker's reach: TRL repeats each prompt K times "
    "and prefills all 16 rows in `transformers` `generate` (`disable_compile=True`), where posttrain's sampler "
    "prefills each distinct prompt once and its K samples share the cache rows (the counted prompt tokens are one "
    "prompt per episode on both sides); TRL's training forward also computes each token's entropy (for its "
    "`entropy` metric; not optional in 1.16), posttrain's does not; TRL's reference and policy forwards use its "
    "fused chunked LM head, posttrain's its own chunked log-probs. TRL samples under bf16 autocast from the fp32 "
    "policy; posttrain's sampler decodes from its own bf16 copy of the weights, refreshed after every optimizer "
    "step (the copy is in posttrain's peak RSS and the refresh in its step time). Since commit cdea84b "
    "posttrain's training and no-grad forwards lay a prompt and its responses out as one prefix-shared row (the "
    "prompt computed once, `prefix_sharing`), where TRL feeds a row a response: as for DPO, that saving is part "
    "of posttrain's speed, not a difference in the work (episodes, prompt and generated tokens are counted alike). "
    "Since commit 5f7e71f posttrain's no-grad forwards (reference, log π_old) take 4 micro-batches of responses at "
    "once; TRL's take `per_device_train_batch_size` rows at a time. Sampled lengths differ by "
    "chance, as in PPO (hence a ✗ on generated tokens is expected, most of all for the tiny model, whose "
    "responses often end early); prompts and episodes are equal by construction.",
]


if __name__ == "__main__":
    main()
