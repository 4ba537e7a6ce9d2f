"""bradley_terry_loss: hand numbers, the σ symmetry, centring, gradcheck."""

import math

import torch

from posttrain.losses import bradley_terry_loss


def test_hand_numbers():
    # r_w = 2, r_l = 1: -log σ(1) = log(1 + e^-1) = 0.3132617.
    # margin 0.5: log(1 + e^-0.5) = 0.4740770.
    # center_coef 0.1 adds 0.1·(2 + 1)² = 0.9 -> 1.2132617.
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor([0.3132617]))
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5]))
    torch.testing.assert_close(loss, torch.tensor([0.4740770]))
    loss, _ = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor([1.2132617]))
    assert stats["rewards/accuracy"].item() == 1.0 and stats["rewards/margin"].item() == 1.0


def test_swapping_arguments_follows_sigma():
    # -log σ(d) + log σ(-d) = softplus(-d) - softplus(d) = -d.
    torch.manual_seed(0)
    a, b = torch.randn(16), torch.randn(16)
    forward, _ = bradley_terry_loss(a, b)
    backward, _ = bradley_terry_loss(b, a)
    torch.testing.assert_close(forward - backward, -(a - b))


def test_equal_rewards_give_log_two_and_stats_are_detached():
    chosen = torch.zeros(3, requires_grad=True)
    loss, stats = bradley_terry_loss(chosen, torch.zeros(3))
    torch.testing.assert_close(loss.detach(), torch.full((3,), math.log(2.0)))
    assert all(not value.requires_grad for value in stats.values())


def test_gradcheck_float64():
    torch.manual_seed(0)
    chosen = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(4, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c, r: bradley_terry_loss(c, r, margin=margin, center_coef=0.05)[0], (chosen, rejected)
    )
