"""posttrain's sampler vs plain transformers `model.generate`, and both against the roofline.

    .venv/bin/python benchmarks/sampling.py [--batches 8,32] [--new-tokens 128] [--repeats 3]

Same model (SmolLM2-135M-Instruct), same chat-templated prompts, bf16 on both sides (generate
runs a bf16 copy of the model; the sampler its own bf16 inference copy), ancestral sampling at
temperature 1 with no top-k / top-p, the same allocator settings and threads, each run in its own
process, tools alternating. Work is counted as decode slots, B × steps (a finished row still
costs its slot on both sides); generate is held to the full length with min_new_tokens, the
sampler stops when every row has ended, so its step count is reported beside it.

Roofline of one decode step: max(weight bytes ÷ memory bandwidth, FLOPs ÷ bf16 matmul ceiling),
with weight bytes = 2 · P (every matmul weight read once, the tied LM head once), FLOPs =
2 · B · P + 4 · B · L · S · H (attention over S cached positions), both rates measured here:
bandwidth as the bytes read + written per second by a 512 MB bf16 tensor copy, the ceiling by
benchmarks/matmul.py. Writes benchmarks/results/sampling-*.json and benchmarks/SAMPLING.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [f"Write a long, detailed story about a dragon called number {i}, with many characters." for i in range(64)]


def worker(tool: str, batch: int, new_tokens: int) -> dict:
    """One measurement in this process: two warm-up calls, then one timed call."""
    import torch

    from posttrain.data import TokenizedPrompt, tokenize_prompt
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.sampling import Sampler, SamplingParams

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:batch]]
    prompts = [TokenizedPrompt(tokenize_prompt(c, tokenizer), c, {}, i) for i, c in enumerate(conversations)]
    if tool == "posttrain":
        sampler = Sampler(load_causal_lm("smollm2-135m-instruct"), tokenizer, precision="bf16", batch_size=batch)
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)

        def run() -> int:
            return sampler.generate(prompts, params).response_ids.shape[1]
    else:
        model = load_causal_lm("smollm2-135m-instruct", dtype=torch.bfloat16).eval()
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p.input_ids)) + p.input_ids for p in prompts])
        mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])

        def run() -> int:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            return out.shape[1] - width
    for _ in range(2):
        run()
    start = time.perf_counter()
    steps = run()
    seconds = time.perf_counter() - start
    return {"tool": tool, "batch": batch, "steps": steps, "seconds": seconds, "slots_per_s": batch * steps / seconds,
            "prompt_tokens": int(sum(len(p.input_ids) for p in prompts))}


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184",
            "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def bandwidth() -> float:
    """Bytes read + written per second by a 512 MB bf16 copy (median of 20)."""
    import torch

    a = torch.randn(256 * 1024 * 1024).to(torch.bfloat16)
    b = torch.empty_like(a)
    times = []
    for _ in range(22):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 2 / statistics.median(times[2:])


def roofline(batch: int, ceiling: float, bytes_per_s: float, context: float) -> float:
    """Decode slots per second at the roofline for SmolLM2-135M (P, L, H from its config)."""
    from posttrain.models import load_causal_lm

    model = load_causal_lm("smollm2-135m-instruct")
    cfg = model.config
    # Every 2-D weight once: the tied embedding is read whole only as the LM head.
    matmul_params = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    flops = 2 * batch * matmul_params + 4 * batch * cfg.num_hidden_layers * context * cfg.hidden_size
    seconds = max(2 * matmul_params / bytes_per_s, flops / ceiling)
    return batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "BATCH", "NEW_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    env = environment(args.threads)
    ceiling = json.loads(subprocess.run([sys.executable, str(HERE / "matmul.py")], env=env, capture_output=True,
                                        text=True, check=True).stdout.splitlines()[-1])["bf16"]["flops_per_s"]
    bytes_per_s = json.loads(subprocess.run([sys.executable, "-c", "import json, sampling; print(json.dumps("
                                             "sampling.bandwidth()))"], cwd=HERE, env=env, capture_output=True,
                                            text=True, check=True).stdout)
    runs = []
    for batch in map(int, args.batches.split(",")):
        for _ in range(args.repeats):
            for tool in ("posttrain", "transformers"):
                out = subprocess.run([sys.executable, __file__, "--worker", tool, str(batch), str(args.new_tokens)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.splitlines()[-1]))
                print(runs[-1], flush=True)
    rows = []
    for batch in map(int, args.batches.split(",")):
        mine = [r for r in runs if r["batch"] == batch]
        rate = {tool: statistics.median(r["slots_per_s"] for r in mine if r["tool"] == tool)
                for tool in ("posttrain", "transformers")}
        context = mine[0]["prompt_tokens"] / batch + args.new_tokens / 2
        bound = roofline(batch, ceiling, bytes_per_s, context)
        steps = sorted({r["steps"] for r in mine if r["tool"] == "posttrain"})
        rows.append(f"| {batch} | {args.new_tokens} | {rate['posttrain']:.0f} (steps {steps}) | "
                    f"{rate['transformers']:.0f} | **{rate['posttrain'] / rate['transformers']:.2f}×** | {bound:.0f} | "
                    f"{100 * rate['posttrain'] / bound:.0f} % | {100 * rate['transformers'] / bound:.0f} % |")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    result = {"date": stamp, "threads": args.threads, "bf16_ceiling_flops": ceiling, "bandwidth_bytes": bytes_per_s,
              "runs": runs}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"sampling-{stamp}.json").write_text(json.dumps(result, indent=1))
    table = "\n".join([
        "# Sampling: posttrain's sampler vs transformers `generate` (SmolLM2-135M-Instruct, bf16)", "",
        f"Made by `benchmarks/sampling.py` on {stamp}, {args.threads} threads, {args.repeats} alternating repeats "
        f"(medians); bf16 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s (2048³ GEMM), memory bandwidth "
        f"{bytes_per_s / 1e9:.1f} GB/s (bf16 copy, read + write). Decode slots = batch × decode steps.", "",
        "| batch | new tokens | posttrain slots/s | generate slots/s | ratio | roofline slots/s | posttrain % of "
        "roofline | generate % of roofline |",
        "|---|---|---|---|---|---|---|---|", *rows, ""])
    (HERE / "SAMPLING.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
