"""posttrain DPO pairs/s and peak RSS with prefix sharing on and off (one process per run).

    .venv/bin/python benchmarks/dpo_layouts.py [--model smollm2-135m-instruct] [--steps 2 6]

Each run trains `dpo.train` (sigmoid, β = 0.1, frozen-copy reference, bf16 autocast where
the CPU has it, batch 4 pairs, max_length 256) on examples/data/preferences.jsonl for
warm-up + timed steps; pairs/s is the median of the timed steps' perf/pairs_per_s, peak RSS
is the process's ru_maxrss. The two layouts alternate so a shared machine's drift hits both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(model: str, prefix_sharing: bool, warmup: int, timed: int, precision: str) -> dict:
    from posttrain.config import DPOConfig
    from posttrain.trainers import dpo

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(model=model, data=str(ROOT / "examples/data/preferences.jsonl"), output_dir=out,
                        max_length=256, batch_size=4, max_steps=warmup + timed, lr=1e-6, warmup_ratio=0.0,
                        lr_scheduler="constant", precision=precision, prefix_sharing=prefix_sharing)
        cfg.validate()
        dpo.train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/pairs_per_s"] for r in rows if "perf/pairs_per_s" in r][warmup:]
    return {"prefix_sharing": prefix_sharing, "pairs_per_s": statistics.median(rates), "rates": rates,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 6), metavar=("WARMUP", "TIMED"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.model, args.worker == "on", *args.steps, args.precision)))
        return
    for _ in range(args.repeats):
        for layout in ("on", "off"):
            cmd = [sys.executable, __file__, "--worker", layout, "--model", args.model, "--precision", args.precision,
                   "--steps", *map(str, args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
