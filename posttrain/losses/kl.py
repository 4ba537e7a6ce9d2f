"""Per-token KL(π ‖ π_ref) estimators (the stateful KL-coefficient controllers PPO uses live in
posttrain/trainers/kl_control.py).

Estimators follow Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html):
with tokens sampled from π and r = π_ref/π, k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r.
All take logprobs, ref_logprobs: [B, A] log-probs of the sampled tokens and return [B, A];
the caller masks and reduces.
"""

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref: unbiased, high variance, negative on individual tokens."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½(log π − log π_ref)²: non-negative, low variance, biased (exact to 2nd order)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref/π: unbiased and non-negative, low variance.

    log r is capped at ±20 first, as verl's "low_var_kl" does: e^89 overflows float32, and the
    capped tokens (π_ref/π beyond 5e8) get a finite penalty and no gradient instead of ∞.
    """
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
