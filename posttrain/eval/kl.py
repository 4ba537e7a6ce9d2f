"""The per-sequence log-probabilities behind the KL(A‖BASE) estimate (`metrics.kl_estimate`).

Shapes: B sequences, T = Q prompt + A response tokens.
"""

from __future__ import annotations

import torch

from posttrain.models.precision import autocast
from posttrain.models.value import response_logprobs
from posttrain.ops import masked_sum
from posttrain.sampling import Generation


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, gen: Generation, *, batch_size: int = 8,
                      precision: str = "fp32") -> torch.Tensor:
    """[B] float32 on the CPU: log π(response | prompt) of each of gen's B responses under `model`,
    Σ_t log π(y_t | x, y_<t) over the response_mask (its stop token included), teacher-forced at
    temperature 1 — the model's own distribution, whatever temperature sampled gen.

    model: an HF causal LM (optionally peft-wrapped) that reads gen's token ids (the same
    tokenizer); precision: a resolved "bf16" or "fp32" (autocast of the forward passes).
    """
    if batch_size < 1:
        raise ValueError(f"sequence_logprobs: batch_size={batch_size} must be ≥ 1")
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    input_ids, attention, positions = gen.sequences()
    out = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            mask = gen.response_mask[rows].to(device)
            with autocast(precision, device.type):
                logprobs = response_logprobs(model, input_ids[rows].to(device), attention[rows].to(device),
                                             positions[rows].to(device), mask, temperature=1.0,
                                             with_entropy=False)[0]                    # [b, A]
            out.append(masked_sum(logprobs.float(), mask, dim=-1).cpu())
    finally:
        model.train(training)
    return torch.cat(out)
