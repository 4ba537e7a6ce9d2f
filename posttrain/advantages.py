"""Per-token rewards and advantages: PPO (KL-shaped rewards, GAE) and the critic-free GRPO and
RLOO (group-relative, sequence-level). Torch only.

Shapes: B batch, A response tokens. ``response_mask`` [B, A] bool is True on the generated
tokens up to and including the stop token, a prefix of each row (responses are
right-padded).
"""

import torch

from posttrain.losses.kl import KL_ESTIMATORS
from posttrain.ops import first_true_index


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_prefix(response_mask: torch.Tensor) -> None:
    if (response_mask[:, 1:] & ~response_mask[:, :-1]).any():
        raise ValueError("response_mask must be True on a prefix of each row (right-padded responses)")


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True along the last dim: [B, A] bool -> [B] long; −1 where none."""
    return mask.shape[-1] - 1 - first_true_index(mask.flip(-1))


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·KL_t, plus the sequence score on the last response token.

    Ziegler et al. 2019, Eq. 2 (R = r − β·log π/π_ref), spread per token as in their code and
    Stiennon et al. 2020. The score is placed on the last token the mask includes: the EOS
    token that ended the response (or the final token of a truncated one), never on the
    first pad after it, whose value and log-prob are meaningless.

    scores: [B] sequence scores. logprobs, ref_logprobs: [B, A] log-probs of the sampled
    tokens under the rollout policy and the reference. estimator: a key of KL_ESTIMATORS.
    Returns (rewards [B, A], kl [B, A]), both zero where the mask is False. A row with an
    empty mask gets no score.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_shaped_rewards: estimator={estimator!r}, expected one of {sorted(KL_ESTIMATORS)}")
    kl = _zero_outside(KL_ESTIMATORS[estimator](logprobs, ref_logprobs), response_mask)
    last = last_true_index(response_mask).clamp(min=0).unsqueeze(-1)
    has_tokens = response_mask.any(dim=-1, keepdim=True)
    score = torch.where(has_tokens, scores.unsqueeze(-1).to(kl.dtype), 0.0)
    rewards = (-kl_coef * kl).scatter_add(-1, last, score)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, Eq. 16:

    δ_t = r_t + γ·V_{t+1} − V_t,   Â_t = δ_t + γλ·Â_{t+1},   returns R_t = Â_t + V_t.

    The episode ends at the last included token: there V_{t+1} = 0 and Â_{t+1} = 0, so a
    value predicted on padding never bootstraps into a real token (ragged rows are exact).
    rewards, values: [B, A]; response_mask: [B, A] bool, a prefix of each row.
    Returns (advantages [B, A], returns [B, A]), zero where the mask is False.
    """
    _check_prefix(response_mask)
    rewards = _zero_outside(rewards, response_mask)
    values = _zero_outside(values, response_mask)
    # With padding zeroed and the mask a prefix, V_{t+1} past the last token is 0 and every
    # δ on padding is 0, so the backward recursion restarts at each row's own end.
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=-1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[-1])):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, _zero_outside(advantages + values, response_mask)


def group_normalized_advantages(rewards: torch.Tensor, *, group_size: int, scale: bool = True,
                                eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each response's reward minus its group's mean, divided by the
    group's standard deviation when `scale` (Shao et al. 2024, "DeepSeekMath", §4.1.2, outcome
    supervision: Â = (r − mean(r)) / std(r)). scale=False is Dr. GRPO (Liu et al. 2025,
    "Understanding R1-Zero-Like Training", §3.2): the std division biases updates towards
    groups that are nearly all right or all wrong.

    rewards: [B] with B = G·group_size, the group_size samples of a prompt adjacent (the
    sampler's order). std is the unbiased sample std (torch.std, as TRL); eps keeps a group of
    equal rewards at exactly 0 instead of 0/0. Returns [B], sequence-level (see `per_token`).
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, *, group_size: int, scale: bool = False,
                             eps: float = 1e-4) -> torch.Tensor:
    """RLOO's advantages: each response's reward minus the mean reward of the other K − 1
    samples of its prompt (Ahmadian et al. 2024, "Back to Basics", Eq. 5; Kool et al. 2019):

    Â_i = r_i − 1/(K−1) Σ_{j≠i} r_j = K/(K−1) · (r_i − mean(r)).

    rewards: [B] with B = G·K, the K samples of a prompt adjacent; K ≥ 2. scale: also divide
    by the group's std (+ eps), as GRPO does; off in the RLOO paper. Returns [B].
    """
    if group_size < 2:
        raise ValueError(f"leave_one_out_advantages: group_size={group_size}; the baseline needs K ≥ 2")
    groups = _groups(rewards, group_size)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    advantages = groups - baseline
    if scale:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.reshape(-1)


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level advantages [B] broadcast to every response token: [B, A], 0 off the mask
    (outcome supervision gives every token of a response the same advantage)."""
    return _zero_outside(advantages.unsqueeze(-1).expand(response_mask.shape).to(torch.float32), response_mask)


def zero_variance_groups(rewards: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """[B] bool: True for responses whose group's rewards are all equal (no learning signal;
    DAPO's dynamic sampling, Yu et al. 2025 §3.2, drops such groups)."""
    groups = _groups(rewards, group_size)
    same = (groups == groups[:, :1]).all(-1, keepdim=True)
    return same.expand_as(groups).reshape(-1)


ADVANTAGES = {"grpo": group_normalized_advantages, "rloo": leave_one_out_advantages}
"""Critic-free advantage estimators by name: f(rewards [B], *, group_size, scale) -> [B]."""


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)
