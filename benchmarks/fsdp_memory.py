"""Per-process peak RSS and step time of SFT on 2 processes: FSDP (--sharding fsdp) against DDP.

    .venv/bin/python benchmarks/fsdp_memory.py --model smollm2-135m-instruct            # the measurement
    .venv/bin/python benchmarks/fsdp_memory.py --model tiny-random --steps 1 2          # harness check
    .venv/bin/python benchmarks/fsdp_memory.py --model random-360m --steps 1 3         # a larger model
    LD_PRELOAD=$(ldconfig -p | grep -o '/[^ ]*libtcmalloc_minimal.so.4$') .venv/bin/python benchmarks/fsdp_memory.py

The allocator is the caller's (LD_PRELOAD and MALLOC_* pass to every process) and is recorded in
the result: glibc's default arenas fragment under FSDP's per-layer gathers (measured: the peak grew
by about 350 MiB a step over 4 steps), tcmalloc does not.

Each run is `torchrun --standalone --nproc-per-node 2` over `sft.train` on
examples/data/instructions.jsonl (max_length 256, batch_size 4 per process, precision auto,
OMP_NUM_THREADS=1 per process); the two modes alternate so a shared machine's drift hits both.
Per process it reports:
  - peak RSS in training: VmHWM when training is over, before the final model is gathered and saved
    (FSDP gathers the whole model onto the main process to save it: that is not training);
  - peak RSS in all: ru_maxrss at exit, the save included;
  - step time: the median wall time between the starts of consecutive optimizer steps, warm-up
    steps left out.
The goal (issue 16) is FSDP's training peak ≤ 0.6× DDP's. Writes benchmarks/results/fsdp-memory-<date>.json
(or --json PATH).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from breakdown import rss_bytes

ROOT = Path(__file__).resolve().parents[1]
RANDOM_360M = ROOT / ".bench" / "random-smollm2-360m-shape"


def random_360m() -> str:
    """A randomly initialised model of SmolLM2-360M's shape (hidden 960, 32 layers, 15 query / 5 KV
    heads, MLP 2560, vocabulary 49152, tied embeddings; 362M parameters) with the embedded model's
    tokenizer, written once under .bench/: no 360M checkpoint is available offline, and memory and
    step time do not depend on the weights' values."""
    if not (RANDOM_360M / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from posttrain.models import resolve_model_path

        source = resolve_model_path("smollm2-135m-instruct")
        config = AutoConfig.from_pretrained(source)
        config.update(dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                           intermediate_size=2560, tie_word_embeddings=True))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(RANDOM_360M)
        AutoTokenizer.from_pretrained(source).save_pretrained(RANDOM_360M)
    return str(RANDOM_360M)


def worker(args) -> None:
    """One rank of one run: train, then write its measurements to OUTPUT_DIR/bench-RANK.json."""
    from posttrain.config import SFTConfig, build_config
    from posttrain.trainers import sft

    starts: list[float] = []
    trained: list[float] = []
    optimizer_step, full_model = sft.optimizer_step, sft.full_model

    def timed_step(*a, **kw):
        starts.append(time.perf_counter())  # the boundary between steps: each step's optimizer call
        return optimizer_step(*a, **kw)

    def after_training(*a, **kw):
        trained.append(rss_bytes("VmHWM") / 2**20)
        return full_model(*a, **kw)

    # The trainer is a plain loop; wrapping two of the helpers it calls marks step boundaries and
    # the end of training without changing what it computes.
    sft.optimizer_step, sft.full_model = timed_step, after_training
    warmup, timed = args.steps
    cfg = build_config(SFTConfig, None, dict(
        model=args.model, data=str(ROOT / "examples/data/instructions.jsonl"), output_dir=f"{args.output_dir}/run",
        max_length=256, batch_size=4, max_steps=warmup + timed + 1, lr=1e-5, warmup_ratio=0.0,
        lr_scheduler="constant", precision=args.precision, sharding=args.worker, overwrite=True,
        gradient_checkpointing=args.gradient_checkpointing))
    sft.train(cfg)
    gaps = [b - a for a, b in zip(starts, starts[1:])][warmup:]
    rank = int(os.environ["RANK"])
    row = {"mode": args.worker, "rank": rank, "train_peak_rss_mib": trained[0],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_s": statistics.median(gaps), "step_times_s": gaps}
    Path(args.output_dir, f"bench-{rank}.json").write_text(json.dumps(row))


def launch(mode: str, args, timeout: float) -> list[dict]:
    """One 2-process run; its ranks' measurements. The whole process group dies on a timeout."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--worker", mode, "--output-dir", out, "--model", args.model, "--precision", args.precision,
               "--steps", *map(str, args.steps)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise SystemExit(f"{mode}: still running after {timeout} s; killed\n{output[-3000:]}")
        if proc.returncode:
            raise SystemExit(f"{mode}: exit status {proc.returncode}\n{output[-3000:]}")
        return [json.loads(Path(out, f"bench-{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 6), metavar=("WARMUP", "TIMED"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on in both modes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--json", default=None, help="default benchmarks/results/fsdp-memory-<date>.json")
    parser.add_argument("--worker", choices=("none", "fsdp"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.model == "random-360m":
        args.model = random_360m()
    runs = []
    for _ in range(args.repeats):
        for mode in ("none", "fsdp"):
            rows = launch(mode, args, args.timeout)
            runs.append({"mode": mode, "ranks": rows})
            for row in rows:
                print(f"{'DDP' if mode == 'none' else 'FSDP'} rank {row['rank']}: training peak RSS "
                      f"{row['train_peak_rss_mib']:.0f} MiB, with the save {row['peak_rss_mib']:.0f} MiB, "
                      f"step {row['step_s']:.2f} s", flush=True)

    def worst(mode: str, key: str) -> float:  # the largest process's value, median over repeats
        return statistics.median(max(r[key] for r in run["ranks"]) for run in runs if run["mode"] == mode)

    allocator = {k: v for k, v in os.environ.items() if k == "LD_PRELOAD" or k.startswith("MALLOC_")}
    summary = {"model": args.model, "steps": args.steps, "precision": args.precision,
               "gradient_checkpointing": args.gradient_checkpointing, "allocator": allocator or "glibc default",
               "ddp_train_peak_rss_mib": worst("none", "train_peak_rss_mib"),
               "fsdp_train_peak_rss_mib": worst("fsdp", "train_peak_rss_mib"),
               "ddp_step_s": worst("none", "step_s"), "fsdp_step_s": worst("fsdp", "step_s")}
    summary["rss_ratio"] = summary["fsdp_train_peak_rss_mib"] / summary["ddp_train_peak_rss_mib"]
    print(f"FSDP/DDP training peak RSS per process: {summary['rss_ratio']:.2f} (goal ≤ 0.6); "
          f"step time DDP {summary['ddp_step_s']:.2f} s, FSDP {summary['fsdp_step_s']:.2f} s")
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"fsdp-memory-{dt.datetime.now():%Y-%m-%d-%H%M}.json"
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
