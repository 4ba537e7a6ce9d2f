"""The matmul floor of a step: its GEMMs alone, at the model's own shapes, timed in bf16.

    .venv/bin/python benchmarks/gemm_floor.py [--results benchmarks/results/<full run>.json]

A step cannot take less time than the matrix products it must do. For each SmolLM2 row of a
full run this takes the real tokens posttrain's batches held per step (the run's counts; padding
is work a layout can skip, as posttrain's padding-free passes do, so it is not counted) and
times, in bf16 on the run's thread count, each Linear layer's products at that size — forward
Y = X·Wᵀ [M,K]·[K,N]; for a trained pass also dX = dY·W [M,N]·[N,K] and dW = dYᵀ·X [N,M]·[M,K]
— summed over the 30 layers, plus the LM head's where the pass scores tokens (PASSES says which
passes each workload makes). Attention's T² products, norms, activations, casts, the optimizer
and all generation are left out, so the floor is below any real step: a target that needs a
shorter step than the floor cannot be met on this machine by any scheduling of the same work.
Beside it, the causal attention of every layer (at each micro-batch's mean length), the faster of
torch's SDPA kernel and posttrain's eager attention: a second floor, for the kernels at hand.

Writes benchmarks/results/gemm-floor-<date>.json, which run.py's RESULTS.md reads (targets.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from functools import lru_cache
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def mm_seconds(m: int, k: int, n: int, seconds: float = 0.4) -> float:
    """Wall time of one bf16 [m,k]·[k,n] product: the fastest of 6 windows of ≥ `seconds`/6 after
    a warm-up (the best the machine did, so the floor stays a lower bound when its rate drifts)."""
    a, b = torch.randn(m, k).to(torch.bfloat16), torch.randn(k, n).to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(6):
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds / 6:
            torch.mm(a, b, out=out)
            count += 1
        times.append((time.perf_counter() - start) / count)
    return min(times)


@lru_cache(maxsize=None)
def attention_seconds(rows: int, length: int, heads: int, kv_heads: int, head_dim: int, backward: bool) -> float:
    """Wall time (fastest of 6 windows) of one layer's causal bf16 attention over [rows, heads,
    length, head_dim] queries and `kv_heads` key/value heads, with its backward when `backward`:
    the faster of torch's `scaled_dot_product_attention` (flash on the CPU) and posttrain's
    `eager_attention` (which its passes use for rows of at most EAGER_MAX_LENGTH tokens)."""
    import torch.nn.functional as F

    from posttrain.models.attention import eager_attention

    q = torch.randn(rows, heads, length, head_dim).to(torch.bfloat16).requires_grad_(backward)
    k, v = (torch.randn(rows, kv_heads, length, head_dim).to(torch.bfloat16).requires_grad_(backward)
            for _ in range(2))
    grad = torch.randn(rows, heads, length, head_dim).to(torch.bfloat16)
    kernels = {"flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               "eager": lambda: eager_attention(q, k, v, None, head_dim ** -0.5)}

    def once(kernel):
        with torch.set_grad_enabled(backward):
            out = kernel()
            if backward:
                out.backward(grad)
                q.grad = k.grad = v.grad = None

    best = float("inf")
    for kernel in kernels.values():
        once(kernel)
        for _ in range(6):
            count, start = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - start < 0.1:
                once(kernel)
                count += 1
            best = min(best, (time.perf_counter() - start) / count)
    return best


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) features of one decoder layer's Linear modules (Llama: q, k, v, o, gate, up, down)."""
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def pass_seconds(config: dict, tokens: int, head_positions: int, *, backward: bool) -> float:
    """GEMM seconds of one pass of the decoder over `tokens` rows: every layer's Linear forwards
    (and, with `backward`, both gradients of each), plus the LM head's at `head_positions` rows
    (0: a scalar head, whose products are negligible)."""
    layers, vocab, hidden = config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]
    seconds = 0.0
    for k, n in linear_shapes(config):
        seconds += mm_seconds(tokens, k, n)
        if backward:
            seconds += mm_seconds(tokens, n, k) + mm_seconds(n, tokens, k)
    seconds *= layers
    if head_positions:
        seconds += mm_seconds(head_positions, hidden, vocab)
        if backward:
            seconds += mm_seconds(head_positions, vocab, hidden) + mm_seconds(vocab, head_positions, hidden)
    return seconds


# Per workload, the passes a step must make over its rows, each (backward?, LM head?): SFT and
# DPO's policy score their targets through the LM head; the RM and PPO's critic and reward model
# end in a scalar head. DPO's, GRPO's and RLOO's reference, and PPO's reference and reward model
# are no-grad forwards; PPO trains policy and critic for its 4 epochs. PPO's old log-probs and
# values, RLOO's log π_old (its training forward gives them at μ = 1) and every generation are
# left out (a lower floor).
PASSES = {"sft": [(True, True)], "rm": [(True, False)], "dpo": [(True, True), (False, True)],
          "ppo": [(True, True)] * 4 + [(True, False)] * 4 + [(False, True), (False, False)],
          "grpo": [(True, True), (False, True)], "rloo": [(True, True), (False, True)]}


def step_floor(workload: str, config: dict, counts: dict, steps: int, micro_batches: int, sequences: int,
               prompt_shares: int = 1) -> dict:
    """Seconds of the GEMMs one step of `workload` must do, from posttrain's counts over `steps`
    steps (counts_total of a run): the rows' real tokens (SFT; RM and DPO: `computed_tokens`, each
    prompt once as prefix sharing lays pairs out), prompt + generated tokens for rollouts, the
    prompt tokens once for every `prompt_shares` responses (GRPO, RLOO: a group's prompt once);
    LM-head positions: loss tokens or generated tokens;
    each pass in `micro_batches` equal products, as the workload's micro-batches are. Beside the
    GEMMs, `attention_seconds`: every layer's causal attention at `sequences` rows a micro-batch of
    the mean length, with the faster kernel at hand (a floor for these kernels, not for the machine)."""
    if workload in ("sft", "rm", "dpo"):
        tokens, head = counts.get("computed_tokens", counts["tokens"]), counts.get("loss_tokens", 0)
    else:
        tokens, head = counts["prompt_tokens"] / prompt_shares + counts["generated_tokens"], counts["generated_tokens"]
    rows, positions = round(tokens / steps / micro_batches), round(head / steps / micro_batches)
    seconds = micro_batches * sum(pass_seconds(config, rows, positions if with_head else 0, backward=backward)
                                  for backward, with_head in PASSES[workload])
    length = max(round(rows / sequences), 1)
    attention = micro_batches * config["num_hidden_layers"] * sum(
        attention_seconds(sequences, length, config["num_attention_heads"], config["num_key_value_heads"],
                          config["head_dim"], backward)
        for backward, _ in PASSES[workload])
    return {"seconds": seconds, "attention_seconds": attention, "tokens_per_micro_batch": rows,
            "sequences_per_micro_batch": sequences, "head_positions_per_micro_batch": positions,
            "micro_batches": micro_batches, "passes": PASSES[workload]}


def row_floor(row: dict, report: dict, config: dict) -> dict:
    """{workload: step_floor(...)} for a SmolLM2 row posttrain ran, else {} (KeyError when the
    results file lacks a field the floor needs)."""
    workload = row["workload"]
    if row["model"] != "smollm2" or "counts_total" not in row["posttrain"]:
        return {}
    settings = report["meta"]["settings"][f"{workload}/smollm2"]
    episodes = settings.get("prompts", 0) * settings.get("num_generations", 0)
    micro = episodes // settings["batch_size"] if episodes else 1
    # Rows a micro-batch: the RM and DPO lay each pair out as one prefix-shared row.
    sequences = settings["batch_size"]
    steps = [r["steps"] for r in report["runs"] if r["tool"] == "posttrain" and r["workload"] == workload
             and r["model"] == "smollm2" and "steps" in r]
    if not steps:
        raise KeyError("a posttrain run")
    # GRPO's and RLOO's micro-batches hold whole groups here (batch_size = K), so prefix sharing
    # computes each prompt once for its K responses (counted one prompt per episode).
    shares = settings.get("num_generations", 1) if settings["batch_size"] % settings.get("num_generations", 1) == 0 else 1
    floor = step_floor(workload, config, row["posttrain"]["counts_total"], steps[0], micro, sequences, shares)
    print(workload, json.dumps(floor), flush=True)
    return {workload: floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None, help="a full run's JSON (default: the newest full run)")
    parser.add_argument("--threads", type=int, default=None, help="default: the run's thread count")
    args = parser.parse_args()
    runs = sorted((BENCH / "results").glob("*-full.json"))
    if args.results is None and not runs:
        parser.error("no full run in benchmarks/results/; run benchmarks/run.py first")
    path = Path(args.results) if args.results else runs[-1]
    if not path.is_file():
        parser.error(f"--results: {path}: not a file")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: need at least 1")
    try:
        report = json.loads(path.read_text())
        report["rows"], report["runs"], report["meta"]["settings"]
        threads = args.threads or report["meta"]["threads"]
    except (ValueError, KeyError, TypeError) as error:
        parser.error(f"--results: {path}: not a run.py results file ({type(error).__name__}: {error})")
    if report["meta"].get("quick") or report["meta"].get("profile"):
        parser.error(f"--results: {path}: a quick or profiled run; the floor is judged against a full run")
    torch.set_num_threads(threads)
    from posttrain.models import resolve_model_path

    config = json.loads((Path(resolve_model_path("smollm2-135m-instruct")) / "config.json").read_text())
    floors = {}
    for row in report["rows"]:
        try:
            floors.update(row_floor(row, report, config))
        except (KeyError, TypeError, AttributeError) as error:
            name = f"{row.get('workload')}/{row.get('model')}" if isinstance(row, dict) else repr(row)[:40]
            parser.error(f"--results: {path}: row {name}: not a run.py row ({type(error).__name__}: {error})")
    if not floors:
        parser.error(f"--results: {path}: no SmolLM2 row that posttrain ran")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = BENCH / "results" / f"gemm-floor-{stamp}.json"
    out.write_text(json.dumps({"date": stamp, "results": path.name, "threads": threads,
                               "floors": floors}, indent=1) + "\n")
    print(f"wrote {out.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
