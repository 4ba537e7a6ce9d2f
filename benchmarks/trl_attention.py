"""Which attention implementation is TRL's best on this machine, per workload: TRL's side of the
benchmark alone, loaded with attn_implementation "sdpa" and with "eager", alternating.

    .venv/bin/python benchmarks/trl_attention.py [--workloads sft,rm,dpo,ppo,grpo,rloo] [--repeats 1]

The comparison's rules give TRL its best configuration, including any setting it has that helps;
transformers' eager attention (bf16 products, fp32 softmax) beats SDPA's flash kernel on this CPU
for short rows. Same workers, settings, data, allocator and threads as `run.py` (SmolLM2, full
mode); prints one line per run and writes benchmarks/results/trl-attention-<date>.json with each
run's median step seconds and peak RSS. `run.py --trl-attention` then runs TRL with the winner.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess

from run import (BENCH, DATA, MODELS, SETTINGS, UNITS, WORK, reward_model_folder, run_worker,
                 write_data)

CHOICES = ("sdpa", "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(UNITS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per worker process")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in UNITS:
            parser.error(f"--workloads: unknown {w!r}; choose from {', '.join(UNITS)}")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: need at least 1")
    subprocess.run(["bash", str(BENCH / "setup.sh")], cwd=BENCH.parent, check=True)
    from posttrain.models import resolve_model_path

    now = dt.datetime.now()
    log_dir = WORK / "logs" / now.strftime("trl-attention-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True)
    data = write_data(WORK / "data")
    path = resolve_model_path(MODELS["smollm2"])
    reward_model = reward_model_folder("smollm2", path, args.threads) if "ppo" in workloads else ""
    results = []
    for workload in workloads:
        s = SETTINGS[(workload, "smollm2")]
        warmup, timed = s["full"]
        for repeat in range(args.repeats):
            for attention in CHOICES:
                spec = {k: v for k, v in s.items() if k not in ("full", "quick")}
                spec.update(model_path=path, warmup=warmup, timed=timed, repeat=repeat, seed=0, precision="bf16",
                            gradient_checkpointing=False, profile=False, allocator="glibc",
                            trl_attention=attention, data=str(data[DATA[workload]]), reward_model=reward_model)
                run = run_worker("trl", workload, "smollm2", spec, args.threads, args.timeout, log_dir)
                if "error" in run:
                    parser.exit(1, f"{workload} {attention}: {run['error']} (log {run['log']})\n")
                step, peak = statistics.median(run["step_seconds"]), run["peak_rss_bytes"] / 1e9
                print(f"{workload} {attention} repeat {repeat + 1}: {step:.3f} s/step, peak RSS {peak:.2f} GB",
                      flush=True)
                results.append({"workload": workload, "attention": attention, "repeat": repeat,
                                "median_step_s": step, "peak_rss_gb": peak})
    out = BENCH / "results" / f"trl-attention-{now:%Y-%m-%d-%H%M}.json"
    out.write_text(json.dumps({"date": f"{now:%Y-%m-%d %H:%M}", "threads": args.threads, "results": results},
                              indent=1) + "\n")
    print(f"wrote {out.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
