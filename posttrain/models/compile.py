"""Regional compilation: each decoder layer of a model compiled in place by torch.compile.

Why layers and not the whole model: the decoder layers hold nearly all the work and are one
piece of code, so one traced graph serves all of them (SmolLM2: 30), and with dynamic shapes one
graph serves every sequence length too; posttrain's passes around them (packing, the chunked
LM head, gathers) stay eager and readable. PyTorch's "regional compilation" recipe does the same.

Measured on 2 EPYC cores (SmolLM2-135M DPO, 4 pairs a step, fused AdamW):
- bf16 autocast (Zen 4, avx512_bf16; the benchmark's pairs): a step took 1.95 s compiled against
  2.26 s eager (−14 %); the first step 53.8 s with an empty inductor cache, 18.6 s with a warm one
  (dynamo traces again in every process).
- fp32 (Zen 3, no bf16; examples/data/preferences.jsonl, steps 3–10): median 4.62 s compiled
  against 4.61 and 4.97 s eager (no gain: the fp32 matrix products dominate); first step 45.3 s
  cold, 24.2 s warm, against 10.6 s eager; loss after 10 steps equal to 5 digits.
So it pays only on long bf16 runs, and stays off by default.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from posttrain.models.cache import cache_root

INDUCTOR_CACHE = "inductor"
"""Folder under posttrain's cache root where inductor keeps its compiled kernels, unless
TORCHINDUCTOR_CACHE_DIR names another: its default, /tmp/torchinductor_<user>, is wiped with /tmp,
and the cold compile it saves is most of the first step's cost."""


def decoder_layers(model: torch.nn.Module, purpose: str) -> list[torch.nn.Module]:
    """Every submodule whose class a transformers model inside `model` names in
    `_no_split_modules` (its decoder layer: LlamaDecoderLayer), in module order.

    ValueError naming `purpose` (the setting that needs them) when there is none."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{purpose}: {type(model).__name__} has no decoder layers (its transformers "
                         f"models' _no_split_modules name {sorted(names) or 'nothing'}, no submodule matches)")
    return layers


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of `model` in place (`nn.Module.compile(dynamic=True)`) and
    return how many. Parameters, state_dict keys and checkpoints are unchanged; the compile
    itself happens at each layer's first call. Call it after LoRA adapters and gradient
    checkpointing are set up (a checkpointed layer recomputes through the compiled forward).

    Compiled layers compute the same function as eager ones up to float rounding: inductor fuses
    elementwise ops and keeps their intermediates in fp32 under bf16 autocast.

    ValueError: the model has no decoder layers, or there is no C++ compiler on PATH (inductor's
    CPU code is C++, built at the first call).
    """
    layers = decoder_layers(model, "compile")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ValueError(f"compile: no C++ compiler {compiler!r} on PATH; torch.compile builds C++ kernels on "
                         "CPU (apt install g++, or run without --compile)")
    # A compiler that is there but fails (CXX=/bin/false, a broken toolchain) would stop the run at
    # its first step with inductor's traceback; an empty program (about 0.1 s) finds it now.
    probe = subprocess.run([compiler, "-x", "c++", "-fsyntax-only", "-"], input="int main() { return 0; }\n",
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        said = " ".join((probe.stderr or probe.stdout).split())[:200] or f"exit status {probe.returncode}"
        raise ValueError(f"compile: the C++ compiler {compiler!r} cannot compile an empty program ({said}); "
                         "torch.compile builds C++ kernels on CPU (fix CXX or the compiler, or run without --compile)")
    # Importing transformers' trainers already set the variable to inductor's default (its
    # cache_dir() writes the default back): only a value other than that one is the user's.
    if os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())) == \
            os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / INDUCTOR_CACHE)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


__all__ = ["INDUCTOR_CACHE", "compile_layers", "decoder_layers"]
