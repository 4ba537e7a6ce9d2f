"""Every loss stays finite, in value and gradient, at the edges of its inputs (issue 15, §1).

`hypothesis` is not installed, so each property runs over a product of explicit edge values
(log-probs of exactly 0, float32 denormals, the −1e-9 of a confident model, very negative
sums) and a seeded random grid. A property failing names its inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from posttrain.losses import (DPO_LOSSES, bradley_terry_loss, grpo_loss, kl_k1, kl_k2, kl_k3, kto_loss,
                              kto_reference_point, orpo_loss, ppo_policy_loss, value_loss)
from posttrain.ops import aggregate

# Log-probs of a sequence (summed) or per token (mean), all ≤ 0: exactly 0 (P = 1 in
# float32), below float32's resolution near 0, denormal, ordinary, and very negative sums.
LOGPROB_EDGES = [0.0, -1e-45, -1e-30, -1e-9, -1e-3, -0.5, -1.0, -1.3, -20.0, -100.0, -1e4, -1e6]
# Rewards, advantages, values and returns: 0, ordinary, and huge (their squares, 1e30, still fit).
SIGNED_EDGES = [0.0, 1.0, -1.0, 1e4, -1e4, 1e15, -1e15]
HYPERPARAMETERS = {"label_smoothing": 0.1, "gamma": 0.5}


def random_logprobs(n: int, seed: int) -> list[float]:
    """n log-probs spread log-uniformly over [−1e6, −1e-8], from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return (-torch.exp(torch.empty(n).uniform_(-18.4, 13.8, generator=g))).tolist()


def grid(*axes: list[float]) -> list[torch.Tensor]:
    """Every combination of the axes' values, one float32 leaf tensor per axis, with grad."""
    rows = list(itertools.product(*axes))
    return [torch.tensor(column, requires_grad=True) for column in zip(*rows)]


def assert_finite(name: str, loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """The loss and the gradient of its sum w.r.t. every input are finite; else name the inputs."""
    loss.sum().backward()
    bad = ~torch.isfinite(loss.detach())
    for x in inputs:
        if x.grad is not None:
            bad |= ~torch.isfinite(x.grad)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(f"{name}: non-finite at inputs {[float(x[i]) for x in inputs]}: "
                             f"loss {float(loss[i])}, grads {[float(x.grad[i]) for x in inputs]}")


LOGPROBS = LOGPROB_EDGES + random_logprobs(6, seed=0)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_every_preference_loss_is_finite_over_the_edge_grid(name):
    spec = DPO_LOSSES[name]
    hyper = {k: HYPERPARAMETERS[k] for k in spec.hyperparameters}
    if spec.needs_reference:
        inputs = grid(LOGPROBS, LOGPROBS, LOGPROB_EDGES, LOGPROB_EDGES)  # 18·18·12·12 combinations
        loss, _, _ = spec.fn(*inputs, beta=0.1, **hyper)
    else:
        inputs = grid(LOGPROBS, LOGPROBS)
        loss, _, _ = spec.fn(*inputs, None, None, beta=0.1, **hyper)
    assert_finite(name, loss, inputs)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_a_policy_log_prob_of_minus_infinity_gives_no_nan(name):
    # −∞ (a token the policy cannot produce) makes some losses +∞, their true value, but never NaN.
    spec = DPO_LOSSES[name]
    hyper = {k: HYPERPARAMETERS[k] for k in spec.hyperparameters}
    chosen, rejected = grid([float("-inf"), -1.0, 0.0], [float("-inf"), -1.0, 0.0])
    refs = (torch.full((9,), -2.0), torch.full((9,), -2.0)) if spec.needs_reference else (None, None)
    loss, _, _ = spec.fn(chosen, rejected, *refs, beta=0.1, **hyper)
    loss.sum().backward()
    # Both −∞ is ∞ − ∞ in every margin; only the pairs with at least one finite log-prob count.
    defined = torch.isfinite(chosen.detach()) | torch.isfinite(rejected.detach())
    assert not loss.detach()[defined].isnan().any(), f"{name}: {loss.detach()}"
    assert not chosen.grad[defined].isnan().any() and not rejected.grad[defined].isnan().any()


def test_orpo_gradient_near_certainty_is_the_true_one():
    # Issue 15: mean log-probs chosen −1e-9, rejected −1.3, λ = 0.1 gave a finite loss and a NaN
    # gradient. True gradient: −1 (the NLL) − λ·σ(−d)/(1 − P_w) with d = log odds_w − log odds_l;
    # as P_w → 1 this tends to −1 − λ·odds_l, odds_l = e^−1.3/(1 − e^−1.3) = 0.374630 -> −1.037463.
    for chosen_value in (-1e-9, 0.0):
        chosen = torch.tensor([chosen_value], requires_grad=True)
        rejected = torch.tensor([-1.3], requires_grad=True)
        loss, _, _ = orpo_loss(chosen, rejected, None, None, beta=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all()
        assert float(chosen.grad) == pytest.approx(-1.037463, abs=1e-6)
    # At P_l = 1 the odds ratio term is infinite; the rejected log-prob is capped at −eps.
    chosen, rejected = torch.tensor([-0.5], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    loss, _, _ = orpo_loss(chosen, rejected, None, None, beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_orpo_matches_the_textbook_formula_in_float64_away_from_the_edges():
    chosen, rejected = grid([-0.01, -0.3, -0.9, -1.1, -2.0, -12.0, -50.0], [-0.01, -0.5, -1.3, -10.0, -60.0])
    chosen64, rejected64 = (x.detach().double().requires_grad_() for x in (chosen, rejected))
    loss, _, _ = orpo_loss(chosen, rejected, None, None, beta=0.1)
    loss.sum().backward()

    def log_odds(p):
        return p - torch.log1p(-torch.exp(p))

    textbook = -chosen64 - 0.1 * torch.nn.functional.logsigmoid(log_odds(chosen64) - log_odds(rejected64))
    textbook.sum().backward()
    torch.testing.assert_close(loss.double(), textbook.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(chosen.grad.double(), chosen64.grad, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(rejected.grad.double(), rejected64.grad, rtol=2e-6, atol=1e-6)


def test_kto_is_finite_over_the_edge_grid():
    policy, ref = grid(LOGPROBS, LOGPROB_EDGES)
    labels = torch.arange(policy.shape[0]) % 2 == 0
    for z0_value in (0.0, 1e6):
        policy.grad = ref.grad = None
        loss, stats = kto_loss(policy, ref, labels, torch.tensor(z0_value), beta=0.1, desirable_weight=1.0,
                               undesirable_weight=1.33)
        assert_finite("kto", loss, [policy, ref])
    z0 = kto_reference_point(torch.tensor(LOGPROB_EDGES), torch.tensor(LOGPROB_EDGES[::-1]))
    assert torch.isfinite(z0)


def test_bradley_terry_is_finite_for_huge_rewards_and_margins():
    chosen, rejected, margin = grid(SIGNED_EDGES, SIGNED_EDGES, [0.0, 1.0, 1e30, -1e30])
    loss, stats = bradley_terry_loss(chosen, rejected, margin=margin)
    assert_finite("bradley_terry", loss, [chosen, rejected])
    assert all(torch.isfinite(v) for v in stats.values())


def test_ppo_policy_loss_is_finite_for_any_log_ratio_and_huge_advantages():
    # logprobs − old_logprobs up to ±1e6: past ±88 the ratio overflowed float32 and max()
    # sent 0·∞ = NaN into exp's backward; the log-ratio is now capped at ±20.
    logprobs, old, advantages = grid(LOGPROB_EDGES, LOGPROB_EDGES, SIGNED_EDGES)
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    loss, stats = ppo_policy_loss(logprobs[:, None], old[:, None], advantages[:, None], mask[:, None],
                                  clip_eps=0.2)
    assert_finite("ppo_policy", loss[:, 0], [logprobs, old, advantages])
    assert all(torch.isfinite(v) for v in stats.values())


def test_grpo_and_the_kl_estimators_are_finite_over_the_edge_grid():
    logprobs, ref = grid(LOGPROB_EDGES, LOGPROB_EDGES)
    for estimator in (kl_k1, kl_k2, kl_k3):
        logprobs.grad = None
        assert_finite(estimator.__name__, estimator(logprobs, ref), [logprobs, ref])
    logprobs.grad = ref.grad = None
    advantages = torch.linspace(-1e6, 1e6, logprobs.shape[0])
    mask = torch.ones_like(logprobs, dtype=torch.bool)[:, None]
    loss, stats = grpo_loss(logprobs[:, None], logprobs.detach()[:, None] - 5.0, advantages[:, None], mask,
                            ref[:, None], clip_eps=0.2, beta=0.04)
    assert_finite("grpo", loss[:, 0], [logprobs, ref])
    assert all(torch.isfinite(v) for v in stats.values())


def test_value_loss_is_finite_for_huge_values_and_returns():
    values, old, returns = grid(SIGNED_EDGES, SIGNED_EDGES, SIGNED_EDGES)
    mask = torch.ones_like(values, dtype=torch.bool)[:, None]
    loss, stats = value_loss(values[:, None], old[:, None], returns[:, None], mask, clip_eps=0.2)
    assert_finite("value", loss[:, 0], [values, old, returns])


def test_all_masked_rows_give_zero_loss_and_zero_gradient():
    # Row 0 has no included token; its entries hold garbage (NaN, ±∞) that must not leak.
    logprobs = torch.tensor([[float("nan"), float("inf")], [-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[float("-inf"), 0.0], [-1.5, -2.0]])
    values = torch.tensor([[float("inf"), 1.0], [0.5, 0.2]], requires_grad=True)
    advantages = torch.tensor([[float("nan"), 3.0], [1.0, -1.0]])
    mask = torch.tensor([[False, False], [True, True]])
    pg, pg_stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    vf, _ = value_loss(values, torch.zeros(2, 2), advantages, mask, clip_eps=0.2)
    gr, gr_stats = grpo_loss(logprobs, old, advantages, mask, old, clip_eps=0.2, beta=0.1)
    for mode in ("token", "sequence"):
        total = aggregate(pg + vf + gr, mask, mode)
        logprobs.grad = values.grad = None
        total.backward(retain_graph=True)
        assert torch.isfinite(total)
        assert torch.equal(logprobs.grad[0], torch.zeros(2)) and torch.equal(values.grad[0], torch.zeros(2))
        assert torch.isfinite(logprobs.grad).all() and torch.isfinite(values.grad).all()
    assert all(torch.isfinite(v) for v in {**pg_stats, **gr_stats}.values())
    nothing = torch.zeros(2, 2, dtype=torch.bool)
    assert float(aggregate(pg.detach(), nothing)) == 0.0
