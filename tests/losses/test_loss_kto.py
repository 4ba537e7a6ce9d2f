"""KTO: hand numbers, the reference point z₀, monotonicity, the analytic gradient, boundaries."""

import math

import torch

from posttrain.losses import kto_loss, kto_reference_point

# Two examples, β = 0.5, z₀ = 1:
#   desirable:   log π_θ = -1, log π_ref = -3 -> r = +2, β·(r − z₀) = +0.5
#   undesirable: log π_θ = -4, log π_ref = -2 -> r = -2, β·(r − z₀) = -1.5
POLICY, REF = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
LABELS = torch.tensor([True, False])


def test_hand_numbers():
    # desirable:   λ_D·(1 − σ(0.5))  = σ(−0.5) = 1/(1 + e^0.5) = 1/2.6487213 = 0.3775407   (λ_D = 1)
    # undesirable: λ_U·(1 − σ(1.5))  = 2·σ(−1.5) = 2/(1 + e^1.5) = 2/5.4816891 = 0.3648510  (λ_U = 2)
    # rewards β·r = 0.5·(+2) = 1 and 0.5·(−2) = −1.
    loss, stats = kto_loss(POLICY, REF, LABELS, torch.tensor(1.0), beta=0.5, desirable_weight=1.0,
                           undesirable_weight=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.3775407, 0.3648510]))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor([1.0]))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor([-1.0]))
    torch.testing.assert_close(stats["kl/z0"], torch.tensor(1.0))


def test_policy_equal_to_reference_with_z0_zero_gives_half_weights():
    # r = 0 and z₀ = 0: every example's loss is λ·σ(0) = λ/2.
    logps = torch.randn(6)
    labels = torch.tensor([True, False] * 3)
    loss, stats = kto_loss(logps, logps, labels, torch.tensor(0.0), beta=0.3, desirable_weight=1.5,
                           undesirable_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.75, 0.25] * 3))
    assert (stats["rewards/chosen"] == 0).all() and stats["rewards/rejected"].shape == (3,)


def test_reference_point_hand_numbers_clamp_and_detach():
    # Mismatched gaps log π_θ − log π_ref = (−2 + 3, −5 + 3, −1 + 3) = (1, −2, 2): mean 1/3.
    policy = torch.tensor([-2.0, -5.0, -1.0], requires_grad=True)
    ref = torch.tensor([-3.0, -3.0, -3.0])
    z0 = kto_reference_point(policy, ref)
    torch.testing.assert_close(z0, torch.tensor(1 / 3))
    assert not z0.requires_grad and z0.shape == ()
    # Gaps (−1, −2): mean −1.5, clamped to 0 (a KL is never negative).
    assert kto_reference_point(torch.tensor([-4.0, -5.0]), torch.tensor([-3.0, -3.0])) == 0


def test_reference_point_over_processes_is_the_mean_of_all_pairs():
    # This process holds gaps (1, −2, 2) (sum 1, count 3); another holds (4) (sum 4, count 1).
    # The all-reduced mean is (1 + 4) / (3 + 1) = 1.25, not the mean of the two means (2.1667).
    other = torch.tensor([4.0, 1.0])
    z0 = kto_reference_point(torch.tensor([-2.0, -5.0, -1.0]), torch.full((3,), -3.0),
                             reduce_sum=lambda t: t + other)
    torch.testing.assert_close(z0, torch.tensor(1.25))


def test_higher_reward_lowers_desirable_loss_and_raises_undesirable_loss():
    r = torch.linspace(-5, 5, 11)
    zeros = torch.zeros(11)
    kw = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    good, _ = kto_loss(r, zeros, torch.ones(11, dtype=torch.bool), torch.tensor(0.5), **kw)
    bad, _ = kto_loss(r, zeros, torch.zeros(11, dtype=torch.bool), torch.tensor(0.5), **kw)
    assert (good.diff() < 0).all() and (bad.diff() > 0).all()
    # A higher reference point makes a desirable answer's reward look worse, an undesirable one's better.
    good_hi, _ = kto_loss(r, zeros, torch.ones(11, dtype=torch.bool), torch.tensor(2.0), **kw)
    bad_hi, _ = kto_loss(r, zeros, torch.zeros(11, dtype=torch.bool), torch.tensor(2.0), **kw)
    assert (good_hi > good).all() and (bad_hi < bad).all()


def test_gradient_is_analytic():
    # s = β·(r − z₀); d/dr [λ_D·σ(−s)] = −λ_D·β·σ(s)·σ(−s); d/dr [λ_U·σ(s)] = +λ_U·β·σ(s)·σ(−s).
    beta, z0 = 0.7, 0.4
    r = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(9) % 2 == 0
    loss, _ = kto_loss(r, torch.zeros(9, dtype=torch.float64), labels, torch.tensor(z0, dtype=torch.float64),
                       beta=beta, desirable_weight=1.3, undesirable_weight=0.6)
    (grad,) = torch.autograd.grad(loss.sum(), r)
    s = beta * (r.detach() - z0)
    slope = beta * torch.sigmoid(s) * torch.sigmoid(-s)
    torch.testing.assert_close(grad, torch.where(labels, -1.3 * slope, 0.6 * slope))


def test_extreme_log_probs_give_finite_loss_and_gradient():
    # Log-probs of 0 (certain) and −1e4 (impossible), both ways round, and a huge z₀:
    # β·(r − z₀) reaches ±1000, where σ saturates; loss and gradient must stay finite.
    policy = torch.tensor([0.0, -1e4, 0.0, -1e4, 0.0, 0.0], requires_grad=True)
    ref = torch.tensor([-1e4, 0.0, -1e4, 0.0, 0.0, 0.0])
    labels = torch.tensor([True, True, False, False, True, False])
    for z0 in (torch.tensor(0.0), kto_reference_point(policy, ref), torch.tensor(1e4)):
        loss, _ = kto_loss(policy, ref, labels, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        (grad,) = torch.autograd.grad(loss.sum(), policy)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (z0, loss, grad)
        assert ((loss >= 0) & (loss <= 1)).all()
    # z₀ = 0: the desirable answer the policy made certain costs σ(−1000) = 0, the impossible one 1.
    loss, _ = kto_loss(policy, ref, labels, torch.tensor(0.0), beta=0.1, desirable_weight=1.0,
                       undesirable_weight=1.0)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 0.5]))
    assert math.isclose(float(kto_loss(torch.tensor([-1e-3]), torch.tensor([0.0]), torch.tensor([True]),
                                       torch.tensor(0.0), beta=1.0, desirable_weight=1.0,
                                       undesirable_weight=1.0)[0]), 0.50025, rel_tol=1e-6)
