"""KL-shaped rewards and GAE: hand numbers, the reward on EOS, a slow reference loop."""

import pytest
import torch

from posttrain.advantages import (ADVANTAGES, gae, group_normalized_advantages, kl_shaped_rewards,
                                  leave_one_out_advantages, per_token, zero_variance_groups)


def test_kl_shaped_rewards_hand_numbers():
    # Row 0 ends with EOS at index 1 (index 2 is the first pad); row 1 fills all 3 tokens.
    # k1 = logp - ref = [[0.1, 0.2, (pad)], [0.3, 0.0, 0.1]], β = 0.5, scores [1, 2]:
    # rewards = -0.5·kl + score on the last real token
    #         = [[-0.05, -0.1 + 1, 0], [-0.15, 0, -0.05 + 2]] = [[-0.05, 0.9, 0], [-0.15, 0, 1.95]].
    logprobs = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards, kl = kl_shaped_rewards(
        torch.tensor([1.0, 2.0]), logprobs, torch.zeros(2, 3), mask, kl_coef=0.5
    )
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-0.15, 0.0, 1.95]]))
    torch.testing.assert_close(kl, torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.1]]))


def test_kl_shaped_rewards_empty_row_and_estimator_choice():
    mask = torch.tensor([[False, False]])
    rewards, kl = kl_shaped_rewards(torch.tensor([5.0]), torch.ones(1, 2), torch.zeros(1, 2), mask, kl_coef=0.1)
    assert (rewards == 0).all() and (kl == 0).all()
    # k2 of a log-ratio 1 is ½.
    one_token = (torch.tensor([0.0]), torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    _, kl = kl_shaped_rewards(*one_token, kl_coef=0.1, estimator="k2")
    torch.testing.assert_close(kl, torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="estimator='k4'"):
        kl_shaped_rewards(*one_token, kl_coef=0.1, estimator="k4")


def test_gae_hand_numbers():
    # γ = 0.9, λ = 0.8, tokens 0 and 1 real, index 2 is padding holding garbage (r = 5, V = 7).
    # t = 1 (last): δ = 1 + 0.9·0 - 0.2 = 0.8, Â = 0.8.
    # t = 0: δ = 0 + 0.9·0.2 - 0.5 = -0.32, Â = -0.32 + 0.72·0.8 = 0.256.
    # returns = Â + V = [0.756, 1.0, 0].
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 7.0]])
    mask = torch.tensor([[True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.256, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.756, 1.0, 0.0]]))


def _slow_gae(rewards, values, lengths, gamma, lam):
    """The textbook loop, one row and one step at a time, over each row's real tokens only."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b][t + 1] if t + 1 < length else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
    return torch.tensor(advantages, dtype=torch.float64)


def test_gae_matches_slow_loop_on_ragged_rows():
    torch.manual_seed(0)
    lengths = [7, 0, 3, 1, 5]
    rewards = torch.randn(5, 7, dtype=torch.float64)
    values = torch.randn(5, 7, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor(lengths).unsqueeze(-1)
    advantages, returns = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = _slow_gae(rewards.tolist(), values.tolist(), lengths, 0.95, 0.9)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask, expected + values, 0.0))


def test_gae_rejects_a_mask_with_holes():
    with pytest.raises(ValueError, match="prefix"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[True, False, True]]), gamma=1.0, lam=1.0)


def test_group_normalised_advantages_hand_numbers():
    # Group 1: r = (1, 2, 3): mean 2, sample std 1 → (−1, 0, 1) / (1 + 1e-4).
    # Group 2: r = (0, 0, 6): mean 2, std √12 = 3.4641 → (−2, −2, 4) / 3.4642.
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    scaled = group_normalized_advantages(rewards, group_size=3)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    expected[:3] /= 1 + 1e-4
    expected[3:] = torch.tensor([-2.0, -2.0, 4.0]) / (12 ** 0.5 + 1e-4)
    torch.testing.assert_close(scaled, expected)
    # Dr. GRPO: no division by the std.
    torch.testing.assert_close(group_normalized_advantages(rewards, group_size=3, scale=False),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_a_group_of_equal_rewards_gives_zeros_not_nan():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0])
    for scale in (True, False):
        out = group_normalized_advantages(rewards, group_size=4, scale=scale)
        assert torch.isfinite(out).all() and (out[:4] == 0).all()
    assert zero_variance_groups(rewards, group_size=4).tolist() == [True] * 4 + [False] * 4
    assert (leave_one_out_advantages(rewards, group_size=4, scale=True)[:4] == 0).all()
    assert group_normalized_advantages(torch.tensor([3.0, 1.0]), group_size=1).tolist() == [0.0, 0.0]


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # r = (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 → (−3, −1.5, 4.5),
    # which is K/(K−1)·(r − mean) = 1.5·(−2, −1, 3).
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 2.0])
    out = leave_one_out_advantages(rewards, group_size=3)
    torch.testing.assert_close(out[:3], torch.tensor([-3.0, -1.5, 4.5]))
    for i in range(6):
        group = rewards[(i // 3) * 3: (i // 3) * 3 + 3]
        others = torch.cat([group[: i % 3], group[i % 3 + 1:]])
        assert out[i].item() == pytest.approx(rewards[i].item() - others.mean().item())
    with pytest.raises(ValueError, match="K ≥ 2"):
        leave_one_out_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_normalized_advantages(rewards, group_size=4)


def test_sequence_advantages_reach_every_response_token_only():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = per_token(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    assert set(ADVANTAGES) == {"grpo", "rloo"}
