"""Which operators one SmolLM2 SFT step spends its time in (torch.profiler, self CPU time).

    .venv/bin/python benchmarks/step_ops.py [--rows 4 --length 256] [--top 15] [--json PATH]

The step is levers.py's baseline (TokenLogprobs under bf16 autocast, backward, clip, fused
AdamW), profiled over 2 steps after 2 warm-up steps. Prints one JSON line (and writes it to
--json; RESULTS.md shows the newest benchmarks/results/step-ops-*.json of each shape, so pass
`--json benchmarks/results/step-ops-<date>-<rows>x<length>.json` for it to appear there): seconds a step per
operator, largest first, and the step's total; run it with run.py's allocator settings and
threads (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 OMP_NUM_THREADS=2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from levers import batch, refuse_bad_shape_or_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the line to this file")
    args = parser.parse_args()
    if args.top < 1:
        parser.error(f"--top {args.top}: need at least 1")
    refuse_bad_shape_or_output(parser, args)
    from posttrain.models import load_causal_lm, resolve_model_path
    from posttrain.models.logprobs import TokenLogprobs

    model = load_causal_lm(resolve_model_path("smollm2-135m-instruct"))
    model.train()
    policy = TokenLogprobs(model)
    input_ids, loss_mask, position_ids = batch(model.config.vocab_size, args.rows, args.length)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs = policy(input_ids, None, position_ids, loss_mask)
        (-(logprobs * loss_mask).sum() / loss_mask[:, 1:].sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    steps = 2
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    per_step = {e.key: e.self_cpu_time_total / 1e6 / steps for e in events}
    top = dict(list(per_step.items())[:args.top])
    line = json.dumps({"rows": args.rows, "length": args.length, "threads": torch.get_num_threads(),
                       "step_s": sum(per_step.values()), "ops_s": top})
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
