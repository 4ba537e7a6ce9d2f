"""The machine's matmul ceiling: FLOP/s of a square GEMM in fp32 and in bf16.

    python benchmarks/matmul.py [--n 2048] [--seconds 3] [--dtypes fp32,bf16]   # prints one JSON line

Each dtype runs n×n @ n×n products (2·n³ FLOPs each) for about `seconds` after two
warm-up products, on the same thread count as the trainers; the reported ceiling is the
median over one-second windows, with the best window beside it. (A CPU without native bf16
runs a 2048³ bf16 product in about a minute: `--dtypes fp32` leaves bf16 out.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def gemm_rate(n: int, dtype: torch.dtype, seconds: float) -> dict:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < 1.0:
            torch.mm(a, b, out=out)
            count += 1
        rates.append(2 * n ** 3 * count / (time.perf_counter() - start))
    return {"flops_per_s": statistics.median(rates), "best_flops_per_s": max(rates), "windows": len(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = args.dtypes.split(",")
    for name in names:
        if name not in dtypes:
            parser.error(f"--dtypes: unknown {name!r}; choose from fp32, bf16")
    result = {"n": args.n, "threads": torch.get_num_threads()}
    for name in names:
        result[name] = gemm_rate(args.n, dtypes[name], args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
