"""PPO policy and value losses: hand numbers, clipping on both sides, monotonicity, masks."""

import math

import pytest
import torch

from posttrain.losses import ppo_policy_loss, value_loss


def test_policy_loss_hand_numbers():
    # ε = 0.2. ratio 1.5 (log 1.5) and 0.5 (log 0.5), each with A = +1 and A = -1:
    #   ρ=1.5, A=+1: max(-1.5, -1.2) = -1.2   (clipped branch active)
    #   ρ=1.5, A=-1: max( 1.5,  1.2) =  1.5
    #   ρ=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   ρ=0.5, A=-1: max( 0.5,  0.8) =  0.8   (clipped branch active)
    # clipfrac = 2/4 = 0.5; ratio mean = (1.5 + 1.5 + 0.5 + 0.5)/4 = 1.
    # k3 = (ρ - 1) - ln ρ: 0.5 - 0.4054651 = 0.0945349 and -0.5 + 0.6931472 = 0.1931472,
    # mean = (0.0945349 + 0.1931472)/2 = 0.1438410.
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 4), advantages, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["policy/approx_kl"], torch.tensor(0.1438410))


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [(1.5, 1.0, True), (1.1, 1.0, False), (0.5, 1.0, False), (0.5, -1.0, True), (0.9, -1.0, False), (1.5, -1.0, False)],
)
def test_ratio_is_clipped_on_the_side_the_advantage_points_to(ratio, advantage, clipped):
    # Clipped means no gradient: A > 0 stops above 1 + ε, A < 0 stops below 1 - ε.
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    assert (grad.abs().item() == 0.0) == clipped


def test_higher_advantage_gives_lower_loss():
    advantages = torch.linspace(-2, 2, 9).unsqueeze(0)
    mask = torch.ones(1, 9, dtype=torch.bool)
    for ratio in (0.5, 0.9, 1.0, 1.1, 1.5):
        logprobs = torch.full((1, 9), math.log(ratio))
        loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 9), advantages, mask, clip_eps=0.2)
        assert (loss[0, 1:] < loss[0, :-1]).all()


def test_masked_garbage_and_empty_rows_give_no_nan():
    logprobs = torch.tensor([[-1.0, math.inf], [math.nan, 50.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(2, 2), torch.ones(2, 2), mask, clip_eps=0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(value) for value in stats.values())
    empty = torch.zeros(1, 2, dtype=torch.bool)
    values_loss, value_stats = value_loss(
        torch.tensor([[1.0, math.nan]]), torch.zeros(1, 2), torch.zeros(1, 2), empty, clip_eps=0.2
    )
    assert (values_loss == 0).all() and torch.isfinite(value_stats["value/clipfrac"])


def test_value_loss_hand_numbers():
    # ε = 0.5, V_old = 1, V = 2 -> clipped V = 1.5.
    #   R = 0: (2 - 0)² = 4 vs (1.5 - 0)² = 2.25 -> ½·4 = 2, unclipped wins.
    #   R = 3: (2 - 3)² = 1 vs (1.5 - 3)² = 2.25 -> ½·2.25 = 1.125, clipped wins.
    # clipfrac = 1/2.
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = value_loss(
        torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), torch.tensor([[0.0, 3.0]]), mask, clip_eps=0.5
    )
    torch.testing.assert_close(loss, torch.tensor([[2.0, 1.125]]))
    torch.testing.assert_close(stats["value/clipfrac"], torch.tensor(0.5))


def test_gradcheck_float64():
    torch.manual_seed(0)
    shape = (2, 5)
    mask = torch.rand(shape) > 0.3
    old_logprobs, advantages = torch.randn(shape, dtype=torch.float64) * 0.3, torch.randn(shape, dtype=torch.float64)
    logprobs = (old_logprobs + 0.05 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ppo_policy_loss(x, old_logprobs, advantages, mask, clip_eps=0.2)[0], (logprobs,)
    )
    old_values, returns = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    values = (old_values + 0.05 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: value_loss(v, old_values, returns, mask, clip_eps=0.2)[0], (values,))
