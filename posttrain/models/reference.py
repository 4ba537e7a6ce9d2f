"""The DPO reference model π_ref, three ways, behind one method: logps(batch) -> (chosen, rejected).

* FrozenCopy: a copy of the starting model, in eval mode with no gradients (the default).
* AdaptersOff: with LoRA, the policy itself with its adapters switched off; the base
  weights never train, so this is the starting model without a second copy in memory.
* Precomputed: log-probs computed once before training and carried in each PairBatch
  (ref_logps), cached on disk under `reference_cache_key`; training then holds one model.

The trainer picks one with `reference_mode` at its boundary; reference-free losses (SimPO,
ORPO) use none. Every `logps` returns summed log-probs ([B], [B]) with no autograd graph.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.data import TokenizedPair
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.lora import disabled_adapters
from posttrain.models.pairs import PairBatch, sequence_logps

Autocast = Callable[[], AbstractContextManager]


class FrozenCopy:
    """(a) A frozen copy of `model` on `device`, never wrapped for data parallelism."""

    def __init__(self, model: torch.nn.Module, device, autocast: Autocast):
        self.model = TokenLogprobs(copy.deepcopy(model)).to(device).eval().requires_grad_(False)
        self.device, self.autocast = device, autocast

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            return sequence_logps(self.model, batch, self.device)


class AdaptersOff:
    """(b) The LoRA policy (a TokenLogprobs over a PeftModel) with adapters disabled, in eval
    mode so LoRA dropout cannot differ between calls."""

    def __init__(self, policy: TokenLogprobs, device, autocast: Autocast):
        self.policy, self.device, self.autocast = policy, device, autocast

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with disabled_adapters(self.policy.model), self.autocast():
                return sequence_logps(self.policy, batch, self.device)
        finally:
            self.policy.train(was_training)


class Precomputed:
    """(c) Reference log-probs computed before training, carried by the batch."""

    def __init__(self, device):
        self.device = device

    def logps(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.ref_logps is None:
            raise ValueError("Precomputed reference: the batch carries no ref_logps")
        chosen, rejected = batch.ref_logps.to(self.device).unbind(-1)
        return chosen, rejected


def reference_mode(needs_reference: bool, *, precompute: bool, lora: bool) -> str:
    """"none", "precomputed", "adapters_off" or "frozen_copy", in that order of precedence."""
    if not needs_reference:
        return "none"
    if precompute:
        return "precomputed"
    return "adapters_off" if lora else "frozen_copy"


def reference_cache_key(model_path: str, pairs: list[TokenizedPair], precision: str) -> str:
    """sha256 over what the reference log-probs depend on.

    The model: its resolved path and, for a folder, every file's name, size and mtime (a
    model retrained in place gets a new key). The data: every pair's token ids, which change
    with the data file's contents, max_length, overlong, pairing and the tokenizer and its
    chat template, i.e. every setting that tokenisation depends on. The precision: bf16 and
    fp32 give different log-probs.
    """
    digest = hashlib.sha256()
    files = []
    folder = Path(model_path)
    if folder.is_dir():
        files = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                       for f in folder.rglob("*") if f.is_file())
    digest.update(json.dumps({"version": 1, "model": model_path, "files": files,
                              "precision": precision, "pairs": len(pairs)}).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()


def load_cached_logps(path: Path, n_pairs: int) -> torch.Tensor | None:
    """The [n_pairs, 2] table saved at `path`, or None if there is none."""
    if not path.is_file():
        return None
    table = load_file(str(path))["ref_logps"]
    if table.shape != (n_pairs, 2):
        raise ValueError(f"{path}: reference cache holds {tuple(table.shape)} log-probs, expected ({n_pairs}, 2)")
    return table


def save_cached_logps(path: Path, table: torch.Tensor) -> None:
    """Write atomically, so an interrupted write never leaves a cache file to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"ref_logps": table.contiguous()}, str(tmp))
    os.replace(tmp, path)
