"""The DPO family: pairwise preference losses on sequence log-probabilities.

Every function has the same signature,
    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
       *, beta, **hyperparameters) -> (loss [B], chosen_rewards [B], rejected_rewards [B]),
where each log-prob is a [B] tensor: the log-probability of the whole response (summed over
its tokens) or its per-token mean, as the function's ``DPOLoss`` record says. Implicit
rewards are β·(log π_θ − log π_ref), detached (β·log π_θ for reference-free losses). The
trainer picks a record once from ``DPO_LOSSES`` and reads from it what to feed the function.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _implicit_rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor):
    return (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def _require_no_reference(name: str, ref_chosen_logps, ref_rejected_logps) -> None:
    if ref_chosen_logps is not None or ref_rejected_logps is not None:
        raise ValueError(f"{name} is reference-free: pass ref_chosen_logps=ref_rejected_logps=None")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float, label_smoothing: float = 0.0):
    """DPO, Rafailov et al. 2023, Eq. 7: −log σ(β·Δ), with the margin of log-ratios
    Δ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)) on summed log-probs.

    ``label_smoothing`` ε > 0 gives conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences"): the label is flipped with probability ε, so the loss is the expected BCE
    −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ).
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, *_implicit_rewards(beta, chosen, rejected)


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    *, beta: float, label_smoothing: float):
    """rDPO, Chowdhury et al. 2024 ("Provably Robust DPO", arXiv:2403.00409), the rDPO loss of Sec. 3:

    [(1 − ε)·ℓ(βΔ) − ε·ℓ(−βΔ)] / (1 − 2ε),  ℓ(z) = −log σ(z),

    with ε = ``label_smoothing`` the known flip rate, ε < ½. Unlike cDPO this is an unbiased
    estimate of the clean-label loss, so the −ε term can make single pairs negative.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo_loss: label_smoothing={label_smoothing} must be in [0, 0.5)")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)
    noisy = (1.0 - label_smoothing) * -F.logsigmoid(logits) - label_smoothing * -F.logsigmoid(-logits)
    return noisy / (1.0 - 2.0 * label_smoothing), *_implicit_rewards(beta, chosen, rejected)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float):
    """IPO, Azar et al. 2023 ("A General Theoretical Paradigm…", arXiv:2310.12036), Eq. 17:
    (h − 1/(2τ))² with h = Δ of log-ratios and τ = ``beta``.

    Takes per-token *mean* log-probs (record: length_normalized=True). The paper writes h on
    whole-sequence log-likelihoods, but its squared loss pulls h to a fixed 1/(2τ): with sums,
    h grows with response length, so long pairs dominate and τ means something different for
    every length. Averaging per token makes τ length-free; the IPO authors' reported runs used
    this form (as TRL documents).
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, *_implicit_rewards(beta, chosen, rejected)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta: float):
    """Hinge on the reference-normalised margin, max(0, 1 − βΔ): the rank-calibration hinge of
    SLiC-HF (Zhao et al. 2023, arXiv:2305.10425; margin δ = 1/β, scaled by β) applied to
    π_ref-normalised log-probs, the "hinge-norm" loss of RSO (Liu et al. 2023, arXiv:2309.06657).
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = torch.relu(1.0 - beta * (chosen - rejected))
    return loss, *_implicit_rewards(beta, chosen, rejected)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta: float, gamma: float):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), Eq. 6:
    −log σ(β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ).

    Reference-free (pass ref_* = None) and length-normalised: the inputs are per-token mean
    log-probs. γ = ``gamma`` is the target reward margin. Rewards are β·mean log π.
    """
    _require_no_reference("simpo_loss", ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    return loss, *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, switching forms at −log 2 for precision (Mächler 2012).

    Each form gets an input from its own safe range where it is not selected: ``torch.where``
    still differentiates the unselected branch, and 0·∞ there would be NaN (log1p(−eˣ) at
    x = −1e-9 in float32 is log1p(−1) = −∞).
    """
    near_zero = x > -0.6931471805599453
    x_near, x_far = torch.where(near_zero, x, -1.0), torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _odds_ratio_nll(chosen: Tensor, rejected: Tensor) -> Tensor:
    """L_OR = −log σ(log odds(y_w) − log odds(y_l)) = log(1 + odds_l·(1 − P_w)/P_w) per pair.

    chosen, rejected: [B] mean log-probs, ≤ 0. Finite with finite gradients on [−∞, 0]:
    * P_w → 1 (chosen → 0): log odds(y_w) → ∞, and autograd through it gives 0·∞. For
      chosen > −1 it is written as log1p((odds_l − 1)·(1 − P_w)) − log P_w, smooth up to and
      at chosen = 0, where L_OR = 0 and dL_OR/dchosen = −odds_l. Below −1 the softplus form
      is exact and stable (1 − P_w ≥ 0.63).
    * P_l → 1 (rejected → 0): L_OR itself tends to ∞. Deviation from the paper: rejected is
      capped at −eps (float eps), i.e. 1 − P_l ≥ eps — closer to 0 a mean log-prob is below
      the float's resolution of a log-sum-exp anyway — so odds_l ≤ 1/eps.
    """
    eps = torch.finfo(rejected.dtype).eps
    rejected = rejected.clamp(max=-eps)
    log_odds_rejected = rejected - _log1mexp(rejected)
    near_one = chosen > -1.0
    c_near, c_far = torch.where(near_one, chosen, -0.5), torch.where(near_one, -2.0, chosen)
    near = torch.log1p(torch.expm1(log_odds_rejected) * -torch.expm1(c_near)) - c_near
    far = F.softplus(log_odds_rejected - c_far + _log1mexp(c_far))
    return torch.where(near_one, near, far)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              *, beta: float):
    """ORPO, Hong et al. 2024 (arXiv:2403.07691), Eqs. 6–7: L_SFT + λ·L_OR with
    L_OR = −log σ(log odds(y_w) − log odds(y_l)), odds(y) = P(y)/(1 − P(y)), λ = ``beta``.

    Inputs are per-token *mean* log-probs (P(y) = exp(mean log-prob), as in the paper's Eq. 4),
    reference-free (pass ref_* = None). L_SFT is the chosen response's mean token NLL, which
    is −policy_chosen_logps, so the returned loss already contains it.
    Rewards are β·mean log π. A confident model reaches P(y) = 1 in float32 (mean log-prob
    exactly 0); see ``_odds_ratio_nll`` for how L_OR stays finite there.
    """
    _require_no_reference("orpo_loss", ref_chosen_logps, ref_rejected_logps)
    loss = -policy_chosen_logps + beta * _odds_ratio_nll(policy_chosen_logps, policy_rejected_logps)
    return loss, *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps)


@dataclass(frozen=True)
class DPOLoss:
    """What the trainer needs to know about one preference loss."""

    fn: Callable[..., tuple[Tensor, Tensor, Tensor]]
    """The loss function, with the signature in this module's docstring."""
    needs_reference: bool
    """True: pass reference-model log-probs; False: pass None and skip the reference model."""
    length_normalized: bool
    """True: pass per-token mean log-probs (sum / response length); False: summed log-probs."""
    hyperparameters: tuple[str, ...] = ()
    """Keyword arguments besides ``beta`` that ``fn`` takes (config field names)."""


DPO_LOSSES: dict[str, DPOLoss] = {
    "sigmoid": DPOLoss(dpo_loss, True, False, ("label_smoothing",)),
    "robust": DPOLoss(robust_dpo_loss, True, False, ("label_smoothing",)),
    "ipo": DPOLoss(ipo_loss, True, True),
    "hinge": DPOLoss(hinge_loss, True, False),
    "simpo": DPOLoss(simpo_loss, False, True, ("gamma",)),
    "orpo": DPOLoss(orpo_loss, False, True),
}
