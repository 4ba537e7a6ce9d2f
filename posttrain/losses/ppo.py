"""PPO's clipped policy surrogate and clipped value loss, per token.

Shapes: B batch, A response tokens. The caller reduces with ``posttrain.ops.aggregate``.
"""

import torch

from posttrain.ops import masked_mean


LOG_RATIO_CAP = 20.0
"""|log π_θ − log π_old| above which a token's ratio is held at e^±20 and gives no gradient:
a ratio of 5e8 is a sample no clipped objective can learn from, and e^89 overflows float32."""


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative clipped surrogate, Schulman et al. 2017 ("Proximal Policy Optimization"), Eq. 7:

    loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε_high)),  ρ_t = π_θ(a_t)/π_old(a_t).

    ε_high = clip_eps_high, or clip_eps when None (PPO's symmetric clip); a larger ε_high is
    DAPO's clip-higher (Yu et al. 2025, Eq. 10), which lets unlikely tokens gain probability.

    logprobs [B, A] (with grad), old_logprobs [B, A] (rollout time), advantages [B, A],
    mask [B, A] bool, True = response token. Returns (loss [B, A], zero where mask is False;
    stats). Stats are detached means over the included tokens: "policy/clipfrac" (share of
    tokens where the clipped branch is active), "policy/approx_kl" — the k3 estimator
    (ρ − 1) − log ρ of KL(π_old ‖ π_θ), non-negative and unbiased under π_old's samples —
    and "policy/ratio_mean".
    """
    # Excluded positions may hold padding garbage; zero the log-ratio so exp cannot overflow.
    # Included ones are capped at ±LOG_RATIO_CAP (verl's compute_policy_loss does the same): past
    # e^88 the ratio is inf in float32, and max() would send 0·inf = NaN into exp's backward.
    log_ratio = _zero_outside(logprobs - old_logprobs, mask).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = _zero_outside(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V − R)², (clip(V, V_old ± ε) − R)²) per token.

    Not in the PPO paper: it is the value clipping of OpenAI baselines' ppo2, kept by
    Ziegler et al. 2019 and studied by Engstrom et al. 2020 ("Implementation Matters").
    values [B, A] (with grad), old_values [B, A] (rollout time), returns [B, A],
    mask [B, A] bool. Returns (loss [B, A], zero where mask is False; stats):
    "value/clipfrac" (share of tokens where the clipped branch is larger), detached.
    """
    # Excluded positions may hold padding garbage: zero them so no NaN reaches the backward.
    values, old_values, returns = (_zero_outside(t, mask) for t in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = _zero_outside(0.5 * torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats
