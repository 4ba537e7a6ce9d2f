"""The DPO family: hand numbers, policy = reference, the analytic gradient, the registry."""

import math

import pytest
import torch

from posttrain.losses import DPO_LOSSES, dpo_loss, hinge_loss, ipo_loss, orpo_loss, robust_dpo_loss, simpo_loss

# One pair: log π_θ(y_w) = -1, log π_θ(y_l) = -3, log π_ref(y_w) = log π_ref(y_l) = -2,
# so the log-ratios are +1 and -1 and Δ = 2.
PAIR = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
HYPERPARAMETERS = {"label_smoothing": 0.1, "gamma": 0.5}


def test_sigmoid_hand_numbers():
    # β = 0.5: βΔ = 1 -> -log σ(1) = log(1 + e^-1) = 0.3132617; rewards β·(±1) = ±0.5.
    # cDPO ε = 0.1: 0.9·0.3132617 + 0.1·log(1 + e) = 0.2819355 + 0.1313262 = 0.4132617.
    loss, chosen, rejected = dpo_loss(*PAIR, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.3132617]))
    torch.testing.assert_close((chosen, rejected), (torch.tensor([0.5]), torch.tensor([-0.5])))
    loss, _, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.4132617]))


def test_robust_hand_numbers():
    # ε = 0.1: (0.9·0.3132617 - 0.1·1.3132617) / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617.
    loss, _, _ = robust_dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.1882617]))
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        robust_dpo_loss(*PAIR, beta=0.5, label_smoothing=0.5)


def test_ipo_and_hinge_hand_numbers():
    # IPO, τ = 0.5: (Δ - 1/(2τ))² = (2 - 1)² = 1.
    # Hinge: β = 0.5 -> max(0, 1 - 1) = 0; β = 0.25 -> max(0, 1 - 0.5) = 0.5.
    torch.testing.assert_close(ipo_loss(*PAIR, beta=0.5)[0], torch.tensor([1.0]))
    torch.testing.assert_close(hinge_loss(*PAIR, beta=0.5)[0], torch.tensor([0.0]))
    torch.testing.assert_close(hinge_loss(*PAIR, beta=0.25)[0], torch.tensor([0.5]))


def test_simpo_hand_numbers():
    # Mean log-probs -1 and -3, β = 2, γ = 1: 2·(−1 + 3) − 1 = 3 -> log(1 + e^-3) = 0.0485874.
    # Rewards β·mean log π = -2 and -6.
    loss, chosen, rejected = simpo_loss(PAIR[0], PAIR[1], None, None, beta=2.0, gamma=1.0)
    torch.testing.assert_close(loss, torch.tensor([0.0485874]))
    torch.testing.assert_close((chosen, rejected), (torch.tensor([-2.0]), torch.tensor([-6.0])))
    with pytest.raises(ValueError, match="reference-free"):
        simpo_loss(*PAIR, beta=2.0, gamma=1.0)


def test_orpo_hand_numbers():
    # P(y_w) = 0.5 -> odds 1, log-odds 0; P(y_l) = 0.25 -> odds 1/3, log-odds -ln 3.
    # L_OR = -log σ(ln 3) = log(1 + 1/3) = 0.2876821; NLL = ln 2 = 0.6931472.
    # λ = 0.1: 0.6931472 + 0.1·0.2876821 = 0.7219154.
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    loss, _, _ = orpo_loss(chosen, rejected, None, None, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.7219154]))


@pytest.mark.parametrize("name", [name for name, spec in DPO_LOSSES.items() if spec.needs_reference])
def test_policy_equal_to_reference_gives_zero_rewards(name):
    spec = DPO_LOSSES[name]
    logps = torch.randn(5), torch.randn(5)
    kwargs = {key: HYPERPARAMETERS[key] for key in spec.hyperparameters}
    loss, chosen, rejected = spec.fn(*logps, *logps, beta=0.3, **kwargs)
    assert (chosen == 0).all() and (rejected == 0).all()
    if name in ("sigmoid", "robust"):
        # σ(0) = ½ for every pair, and the robust correction of ln 2 is ((1-ε) - ε)·ln 2/(1-2ε) = ln 2.
        torch.testing.assert_close(loss, torch.full((5,), math.log(2.0)))


def test_sigmoid_gradient_in_delta_is_analytic():
    # d/dΔ [-log σ(βΔ)] = -β·σ(-βΔ).
    beta = 0.7
    delta = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(9, dtype=torch.float64)
    loss, _, _ = dpo_loss(delta, zeros, zeros, zeros, beta=beta)
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    torch.testing.assert_close(grad, -beta * torch.sigmoid(-beta * delta.detach()))


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_every_registered_loss_gradchecks_and_runs_from_its_record(name):
    spec = DPO_LOSSES[name]
    torch.manual_seed(0)
    # Mean log-probs must be negative for ORPO's log(1 - P); the others do not care.
    policy = [(-torch.rand(4, dtype=torch.float64) - 0.1).requires_grad_() for _ in range(2)]
    reference = [-torch.rand(4, dtype=torch.float64) for _ in range(2)] if spec.needs_reference else [None, None]
    kwargs = {key: HYPERPARAMETERS[key] for key in spec.hyperparameters}

    def loss_of(chosen, rejected):
        return spec.fn(chosen, rejected, *reference, beta=0.5, **kwargs)[0]

    assert torch.autograd.gradcheck(loss_of, tuple(policy))
    loss, chosen_rewards, rejected_rewards = spec.fn(*policy, *reference, beta=0.5, **kwargs)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_registry_records_what_the_trainer_needs():
    assert {name for name, spec in DPO_LOSSES.items() if not spec.needs_reference} == {"simpo", "orpo"}
    assert {name for name, spec in DPO_LOSSES.items() if spec.length_normalized} == {"ipo", "simpo", "orpo"}
    with pytest.raises(AttributeError):
        DPO_LOSSES["sigmoid"].needs_reference = False
