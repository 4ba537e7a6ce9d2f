"""Training precision: fp32 everywhere, or bf16 autocast over fp32 master weights.

float16 is not offered: CPUs have no fast fp16 matmul and fp16 training needs loss scaling,
which bf16 (fp32's exponent range) does not.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch

PRECISIONS = ("auto", "bf16", "fp32")

# x86 (avx512_bf16, amx_bf16) and aarch64 (bf16) /proc/cpuinfo flags for native bf16 dot products.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_supports_bf16() -> bool:
    """True if this CPU has native bf16 instructions, so bf16 autocast is faster, not emulated."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags: set[str] = set()
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
        return bool(flags & BF16_CPU_FLAGS)
    # No /proc (macOS, Windows): torch's dispatch level is the only evidence available. It is
    # coarse: an AVX512 CPU without avx512_bf16 (before Cooper Lake) is counted as bf16-capable.
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def device_supports_bf16(device_type: str) -> bool:
    """Whether bf16 compute is native on `device_type` ("cpu" or "cuda")."""
    if device_type == "cpu":
        return cpu_supports_bf16()
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")


def resolve_precision(name: str, device_type: str = "cpu") -> str:
    """Map "auto" | "bf16" | "fp32" to the concrete "bf16" or "fp32" for `device_type`.

    "auto" picks bf16 where the hardware runs it natively, else fp32; "bf16" on hardware
    without it is an error rather than a silent slowdown.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "fp32":
        return "fp32"
    supported = device_supports_bf16(device_type)
    if name == "auto":
        return "bf16" if supported else "fp32"
    if not supported:
        raise ValueError(
            f"precision 'bf16' requested but this {device_type} has no native bf16; use 'fp32' or 'auto'"
        )
    return "bf16"


def autocast(precision: str, device_type: str = "cpu") -> ContextManager:
    """Context for forward passes: bf16 autocast for "bf16", nothing for "fp32".

    Takes a resolved precision (see `resolve_precision`); parameters stay fp32 either way, so
    optimiser updates are applied to fp32 master weights.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"autocast precision must be a resolved 'bf16' or 'fp32', got {precision!r}")
