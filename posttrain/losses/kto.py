"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306): a loss for unpaired feedback, each completion marked desirable or not.

Two functions: ``kto_reference_point`` estimates the reference point z₀ from completions paired
with prompts they do not answer, and ``kto_loss`` scores each example against it. Every
log-prob is the log-probability of a whole completion, summed over its tokens.
"""

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor, *,
                        reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """z₀ = max(0, mean_j [log π_θ(y'_j | x_j) − log π_ref(y'_j | x_j)]), a detached scalar.

    policy_kl_logps, ref_kl_logps: [M] summed log-probs of M mismatched pairs (x_j, y'_j), a
    prompt with another example's completion. The mean estimates KL(π_θ ‖ π_ref) (Sec. 4.1 of
    the paper); it is clamped at 0, as a KL cannot be negative, and detached: the paper does not
    back-propagate through z₀. ``reduce_sum``, when given, sums over data-parallel processes
    (e.g. an all-reduce), so the mean is over every process's pairs. TRL 1.16 averages the
    per-process means instead: the same number when every process holds as many pairs.
    """
    gaps = (policy_kl_logps - ref_kl_logps).detach()
    # [Σ gaps, count] in one tensor: one all-reduce per step.
    totals = torch.stack([gaps.sum(), torch.tensor(float(gaps.numel()), dtype=gaps.dtype, device=gaps.device)])
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    return (totals[0] / totals[1]).clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, z0: Tensor, *, beta: float,
             desirable_weight: float, undesirable_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO, Ethayarajh et al. 2024, Eq. 8 (the loss E[λ_y − v(x, y)]; TRL 1.16's comment
    numbers it 7), with the implied reward r = log π_θ(y|x) − log π_ref(y|x):

      desirable:    λ_D · (1 − σ(β·(r − z₀)))  =  λ_D · σ(−β·(r − z₀))
      undesirable:  λ_U · (1 − σ(β·(z₀ − r)))  =  λ_U · σ(β·(r − z₀))

    Written as σ(∓…) rather than 1 − σ(…), which keeps its precision where the loss is near 0.

    policy_logps, ref_logps: [B] summed log-probs of each example's own completion.
    labels: [B] bool, True = desirable. z0: the scalar reference point (kto_reference_point).
    Returns the loss [B] and detached statistics: "rewards/chosen" [D] and "rewards/rejected"
    [U], the implicit rewards β·r of the D desirable and U undesirable examples, and "kl/z0".
    """
    rewards = beta * (policy_logps - ref_logps)
    shifted = rewards - beta * z0
    loss = torch.where(labels, desirable_weight * torch.sigmoid(-shifted), undesirable_weight * torch.sigmoid(shifted))
    rewards = rewards.detach()
    return loss, {"rewards/chosen": rewards[labels], "rewards/rejected": rewards[~labels], "kl/z0": z0.detach()}
