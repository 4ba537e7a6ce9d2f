"""Levers of issue 14 measured in isolation on one SmolLM2-135M SFT step (4 × 256 tokens, bf16 autocast).

    .venv/bin/python benchmarks/levers.py [--steps 6] [--warmup 2] [--rows 4 --length 256] [--json PATH]

RESULTS.md shows the newest `benchmarks/results/levers-*.json` of each shape: pass
`--json benchmarks/results/levers-<date>.json` for a run to appear there.

Each variant runs in its own process (so its peak RSS is its own) with run.py's allocator
settings and thread count, on the step posttrain's SFT trainer takes: `TokenLogprobs` forward
under bf16 autocast, token-mean NLL, backward, clip at 1.0, fused AdamW, grads set to None.

- `baseline`       that step.
- `compile`        the same with the policy wrapped in `torch.compile` (inductor), with an empty
                   cache directory: the compile a machine pays once.
- `compile-warm`   again in a new process over the cache `compile` left (inductor's FX-graph and
                   kernel caches persist on disk): what every later run pays.
- `attention-math` baseline with SDPA's math backend (explicit products and softmax) in place of
                   the flash-attention kernel transformers' `sdpa` picks on the CPU.
- `no-clip`        baseline without gradient clipping: the reference for the next row.
- `in-backward`    no clipping, and each parameter's AdamW update applied by a
                   `register_post_accumulate_grad_hook` as soon as its gradient is complete, the
                   gradient freed at once (torch's "optimizer in backward" recipe): no step keeps a
                   whole copy of the gradients. Global-norm clipping needs every gradient before the
                   first update, so this cannot run with posttrain's default clip of 1.0.
- `recast`         not a step: the time one fp32 → bf16 cast of every Linear weight takes, which
                   autocast pays on each forward; it bounds what bf16 compute weights kept between
                   optimizer steps could save.

Prints one JSON line per variant: median step seconds over the timed steps, the first step's
seconds (compile time shows there), peak RSS (VmHWM) of the timed steps and of the warm-up
steps, and the loss of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "compile", "compile-warm", "attention-math", "no-clip", "in-backward", "recast")


def batch(vocab: int, rows: int = 4, length: int = 256):
    """Fixed token ids (seeded), loss on the second half of each row, as SFT completions."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    loss_mask = torch.zeros(rows, length, dtype=torch.bool)
    loss_mask[:, length // 2:] = True
    position_ids = torch.arange(length).expand(rows, length)
    return input_ids, loss_mask, position_ids


def refuse_bad_shape_or_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors, before any work, for a batch shape with no loss position or a --json that
    cannot be written (levers.py and step_ops.py)."""
    if args.rows < 1 or args.length < 2:
        parser.error(f"--rows {args.rows} --length {args.length}: need at least 1 row of 2 tokens")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        parser.error(f"--json {args.json}: not a file in an existing folder")


def run_variant(variant: str, steps: int, warmup: int, rows: int, length: int) -> dict:
    import torch

    from posttrain.models import load_causal_lm, resolve_model_path
    from posttrain.models.logprobs import TokenLogprobs

    torch.manual_seed(0)
    model = load_causal_lm(resolve_model_path("smollm2-135m-instruct"))
    model.train()
    input_ids, loss_mask, position_ids = batch(model.config.vocab_size, rows, length)
    if variant == "recast":
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            for w in weights:
                w.to(torch.bfloat16)
            times.append(time.perf_counter() - start)
        return {"variant": variant, "linear_params": sum(w.numel() for w in weights),
                "median_s": statistics.median(times[warmup:])}
    policy = TokenLogprobs(model)
    if variant.startswith("compile"):
        policy = torch.compile(policy)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "in-backward":
        # One fused AdamW per parameter, stepped by the hook once that parameter's grad is final.
        optimizers = {p: torch.optim.AdamW([p], lr=1e-5, weight_decay=0.0, fused=True) for p in params}

        def update(p):
            optimizers[p].step()
            optimizers[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(update)
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    if variant == "attention-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel([SDPBackend.MATH])
    else:
        backend = nullcontext()
    with backend:
        return timed_steps(variant, policy, params, optimizer, (input_ids, loss_mask, position_ids), steps, warmup)


def timed_steps(variant: str, policy, params, optimizer, data, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from breakdown import rss_bytes

    input_ids, loss_mask, position_ids = data
    times, losses, warmup_peak = [], [], 0
    for i in range(warmup + steps):
        if i == warmup:
            # Reset VmHWM (Linux clear_refs "5") so the peak below is the timed steps' own, not the
            # first step's, where optimizer state is allocated.
            warmup_peak = rss_bytes("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs = policy(input_ids, None, position_ids, loss_mask)
        loss = -(logprobs * loss_mask).sum() / loss_mask[:, 1:].sum()
        loss.backward()
        if optimizer is not None:  # in-backward stepped inside backward
            if variant != "no-clip":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 6))
    return {"variant": variant, "first_step_s": times[0], "median_s": statistics.median(times[warmup:]),
            "peak_rss_gb": rss_bytes("VmHWM") / 1e9, "warmup_peak_rss_gb": warmup_peak / 1e9, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="tokens a row (GRPO/RLOO micro-batches: about 78)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None, help="also write the lines to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: need at least 1")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: need at least 1 of each")
    refuse_bad_shape_or_output(parser, args)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.steps, args.warmup, args.rows, args.length)), flush=True)
        return
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if "compile-warm" in variants and ("compile" not in variants
                                       or variants.index("compile") > variants.index("compile-warm")):
        parser.error("--variants: compile-warm reuses the cache compile leaves; list compile before it")
    # The allocator settings and threads of run.py's workers, so these figures sit beside RESULTS.md's.
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="levers-inductor-")
    results = []
    for v in variants:
        out = subprocess.run([sys.executable, __file__, "--worker", v.replace("-warm", ""),
                              "--steps", str(args.steps), "--warmup", str(args.warmup),
                              "--rows", str(args.rows), "--length", str(args.length)],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"levers.py: variant {v} failed (exit {out.returncode}): "
                     f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["variant"] = v
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": args.rows, "length": args.length,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
