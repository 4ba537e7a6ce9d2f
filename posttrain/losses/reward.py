"""Reward-model loss: the Bradley–Terry pairwise likelihood. Shapes: B pairs."""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair negative log-likelihood of the preference under Bradley–Terry.

    loss = −log σ(r_w − r_l − m) + center_coef·(r_w + r_l)²

    The first term is Ouyang et al. 2022 (InstructGPT), Eq. 1; the optional margin m is
    Touvron et al. 2023 (Llama 2), Eq. 2. The second term is the reward-centring auxiliary
    loss of Eisenstein et al. 2023 ("Helping or Herding?"), which pins the otherwise free
    offset of the rewards near zero so they can be compared across runs.

    chosen_rewards, rejected_rewards: [B] scalar rewards r_w, r_l. margin: [B] or None.
    Returns (loss [B], stats): "rewards/accuracy" (fraction with r_w > r_l),
    "rewards/margin" (mean r_w − r_l), "rewards/chosen", "rewards/rejected" (means), all
    detached scalars.
    """
    difference = chosen_rewards - rejected_rewards
    logits = difference if margin is None else difference - margin
    loss = -F.logsigmoid(logits)
    if center_coef:  # not 0·(r_w + r_l)²: the square of rewards ≥ 1.9e19 is inf in float32, and 0·inf NaN
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    with torch.no_grad():
        stats = {
            "rewards/accuracy": (difference > 0).float().mean(),
            "rewards/margin": difference.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
        }
    return loss, stats
