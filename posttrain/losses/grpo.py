"""GRPO's per-token objective: PPO's clipped surrogate plus the k3 KL to the reference.

Shapes: B batch, A response tokens. The caller reduces with ``posttrain.ops.aggregate`` in the
mode ``posttrain.ops.LOSS_TYPES`` gives (grpo, dapo, dr_grpo).
"""

import torch

from posttrain.losses.kl import kl_k3
from posttrain.losses.ppo import ppo_policy_loss
from posttrain.ops import masked_mean


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negated GRPO objective per token, Shao et al. 2024 ("DeepSeekMath"), Eq. 3 and 4:

    loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε_high)) + β·D_t,
    D_t = π_ref/π_θ − log(π_ref/π_θ) − 1   (the k3 estimator: unbiased, non-negative).

    ε_high = clip_eps_high (DAPO's clip-higher, Yu et al. 2025, Eq. 10), clip_eps when None.
    logprobs [B, A] (with grad), old_logprobs [B, A] (rollout time), advantages [B, A],
    mask [B, A] bool, True = response token; ref_logprobs [B, A], needed when beta > 0.
    Returns (loss [B, A], zero where mask is False; stats): ``ppo_policy_loss``'s, plus
    "policy/kl_k3" (the masked mean of D_t, detached) when beta > 0.
    """
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                  clip_eps_high=clip_eps_high)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError(f"grpo_loss: beta={beta} needs ref_logprobs")
        # Excluded positions may hold padding garbage: zero them so no NaN reaches the backward.
        kl = kl_k3(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))
        loss = loss + beta * torch.where(mask, kl, 0.0)
        stats["policy/kl_k3"] = masked_mean(kl.detach(), mask)
    return loss, stats
