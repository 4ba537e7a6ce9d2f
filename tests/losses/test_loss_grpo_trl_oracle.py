"""GRPO's and RLOO's losses and advantages cross-checked against TRL 1.16 on identical random
inputs (TRL is a test-only oracle), to 1e-6 in value and in gradient.

Losses: ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` run the model, so they
are called unbound on a stand-in whose ``_get_per_token_logps_and_entropies`` returns the
prepared per-token log-probs, with TRL's plain-GRPO settings (token-level ratio, no δ, no
off-policy or entropy mask, no vLLM correction, no entropy bonus). Ours is what
``trainers/grpo.policy_epochs`` computes: ``grpo_loss`` reduced by ``ops.aggregate`` in
``LOSS_TYPES``' mode with the minibatch's normaliser. Names map one to one (grpo, dapo,
dr_grpo), each also over two accumulated micro-batches (TRL's dapo divides by the step's
token count, as ours); TRL's bnpo (token mean of each micro-batch) equals our dapo on one.
Advantages: TRL computes them inside ``_generate_and_score_completions``, which generates, so
its few lines of arithmetic are copied below (file and function named) with TRL's own ``nanstd``.

Differences from TRL, checked as ours where they can be:
* TRL 1.16 defaults to ``use_bias_correction_kl=True``: its k3 is multiplied by the ratio
  π_θ/π_old (DeepSeek-V3.2), ours is DeepSeekMath's plain k3 (Eq. 4). The oracle runs with the
  correction off; with it on, the values still agree on-policy (ratio 1) but the gradient
  differs by β·k3 per token, checked as such: TRL's KL gradient is then β(log π − log π_ref),
  the unbiased reverse-KL gradient, ours β(1 − π_ref/π).
* grpo with a response that has no tokens: TRL averages the sequence means over all B rows,
  we over rows with at least one token, so ours = TRL · B / (B − 1) with one empty row.
* RLOO's loss: TRL clips one sequence-level ratio exp(Σ_t log π/π_old) and averages the
  per-response loss; ours is GRPO's token-level clipped surrogate with RLOO's advantages,
  reduced by loss_type (RLOOConfig: grpo). On-policy the values agree and TRL's gradient on a
  response's tokens is its length times ours (ours is a per-response token mean). Off-policy
  (μ > 1 or several minibatches) the two clip differently and are not compared.
* RLOO's KL is in the reward in both (k1 under π_old, summed over the response, β·KL
  subtracted before the baseline); TRL's ``normalize_advantages`` (off by default, as our
  RLOOConfig.scale_rewards) whitens over the whole batch, our ``scale`` divides by each
  group's std as GRPO does: not compared.
* TRL's scale_rewards="batch" and NaN ("unscorable") rewards have no counterpart here.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.advantages import group_normalized_advantages, leave_one_out_advantages
from posttrain.losses import kl_k1, kl_k3
from posttrain.losses.grpo import grpo_loss
from posttrain.ops import LOSS_TYPES, aggregate, aggregate_count, masked_sum

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_trainer = pytest.importorskip("trl.trainer.rloo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402  (after the skip: TRL is optional)

B, A = 8, 6
MAX_NEW_TOKENS = 10
"""dr_grpo's constant: the configured length limit, larger than this batch's padded width A."""
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _identity(x):
    return x


def _reduce(x, reduction):
    return x


ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=_identity,
                              gather_for_metrics=_identity, reduce=_reduce)


def _batch(seed: int, rows: int = B) -> dict:
    """Right-padded responses of 1..A tokens; log-probs on padding are garbage, as in a batch.
    old differs from the policy by e^{±0.5}-ish ratios, so both clip edges are crossed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, A + 1, (rows,), generator=g)
    mask = torch.arange(A) < lengths[:, None]
    logprobs = -3 * torch.rand(rows, A, generator=g, dtype=torch.float64)
    old = logprobs + 0.5 * torch.randn(rows, A, generator=g, dtype=torch.float64)
    ref = logprobs + 0.3 * torch.randn(rows, A, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    return {"logprobs": logprobs.requires_grad_(), "old": old, "ref": ref, "advantages": advantages, "mask": mask}


def _trl_grpo_loss(loss_type, logprobs, old, ref, advantages, mask, *, beta, accumulation=1, num_items=None,
                   bias_correction_kl=False):
    """TRL's loss for one micro-batch, and the metrics it logged ("train" mode)."""
    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *_, **__: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=MAX_NEW_TOKENS, _entropy_bonus_enabled=False, accelerator=ACCELERATOR,
        _metrics=metrics,
        # steps_per_generation defaults to the accumulation steps: one generation batch per step.
        args=SimpleNamespace(delta=None, use_bias_correction_kl=bias_correction_kl, steps_per_generation=accumulation),
    )
    rows = mask.shape[0]
    inputs = {"prompt_ids": torch.ones(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.zeros(rows, A, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "ref_per_token_logps": ref,
              # dapo: the generation batch's token count (all micro-batches of the step).
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs), metrics["train"]


def _our_grpo_loss(loss_type, batch, micro_rows, *, beta, old=None):
    """What policy_epochs backpropagates for one minibatch: the sum over its micro-batches of
    aggregate(grpo_loss), all divided by the minibatch's count; plus each micro-batch's stats."""
    mask, mode = batch["mask"], LOSS_TYPES[loss_type]
    normalizer = len(mask) * MAX_NEW_TOKENS if loss_type == "dr_grpo" else int(aggregate_count(mask, mode))
    total, stats = 0.0, []
    for rows in micro_rows:
        loss, part = grpo_loss(batch["logprobs"][rows], (batch["old"] if old is None else old)[rows],
                               batch["advantages"][rows, None].expand(-1, A), mask[rows], batch["ref"][rows],
                               clip_eps=EPS_LOW, clip_eps_high=EPS_HIGH, beta=beta)
        total = total + aggregate(loss, mask[rows], mode, normalizer=max(normalizer, 1))
        stats.append(part)
    return total, stats


def _grad(loss, leaf):
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


CASES = [  # (ours, TRL's, micro-batches per optimizer step)
    ("grpo", "grpo", 1), ("grpo", "grpo", 2), ("dapo", "dapo", 1), ("dapo", "dapo", 2), ("dapo", "bnpo", 1),
    ("dr_grpo", "dr_grpo", 1), ("dr_grpo", "dr_grpo", 2),
]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("ours", "trl", "accumulation"), CASES)
def test_grpo_loss_matches_trl_grpo_trainer(ours, trl, accumulation, beta):
    batch = _batch(seed=accumulation)
    micro_rows = torch.arange(B).chunk(accumulation)
    loss, stats = _our_grpo_loss(ours, batch, micro_rows, beta=beta)
    # TRL's step: one _compute_loss per micro-batch, summed (each already scaled for accumulation).
    trl_loss, trl_metrics = 0.0, []
    for rows in micro_rows:
        part, logged = _trl_grpo_loss(trl, batch["logprobs"][rows], batch["old"][rows], batch["ref"][rows],
                                      batch["advantages"][rows], batch["mask"][rows], beta=beta,
                                      accumulation=accumulation, num_items=batch["mask"].sum())
        trl_loss, trl_metrics = trl_loss + part, trl_metrics + [logged]
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    leaf = batch["logprobs"]
    torch.testing.assert_close(_grad(loss, leaf), _grad(trl_loss, leaf), atol=1e-6, rtol=0)
    # Both sides of the clip are exercised: ratio < 1 − ε_low with A < 0, > 1 + ε_high with A > 0.
    assert sum(m["clip_ratio/low_mean"][0] for m in trl_metrics) > 0
    assert sum(m["clip_ratio/high_mean"][0] for m in trl_metrics) > 0
    for part, logged in zip(stats, trl_metrics):
        assert float(part["policy/clipfrac"]) == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-6)
        if beta:
            assert float(part["policy/kl_k3"]) == pytest.approx(logged["kl"][0], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_grpo_loss_against_trl_defaults_differs_by_the_kl_gradient(loss_type):
    # μ = 1, one minibatch: no old log-probs, ρ = π/π.detach() = 1 in value, so TRL's default
    # importance-corrected KL term β·k3·ρ has our value β·k3. Its gradient does not: ∂ρ/∂log π = 1
    # adds β·k3 per token, turning ours, β(1 − π_ref/π), into β(log π − log π_ref), the unbiased
    # reverse-KL gradient (TRL's use_bias_correction_kl, after DeepSeek-V3.2). Ours is
    # DeepSeekMath's Eq. 4 as written: TRL's gradient = ours + β·k3·∂(reduction)/∂(token loss).
    beta, batch = 0.04, _batch(seed=3)
    logprobs, mask, on_policy = batch["logprobs"], batch["mask"], batch["logprobs"].detach()
    loss, _ = _our_grpo_loss(loss_type, batch, [torch.arange(B)], beta=beta, old=on_policy)
    trl_loss, _ = _trl_grpo_loss(loss_type, logprobs, None, batch["ref"], batch["advantages"], mask,
                                 beta=beta, bias_correction_kl=True)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    per_token = torch.zeros(B, A, dtype=torch.float64, requires_grad=True)
    normalizer = B * MAX_NEW_TOKENS if loss_type == "dr_grpo" else int(aggregate_count(mask, LOSS_TYPES[loss_type]))
    weight = _grad(aggregate(per_token, mask, LOSS_TYPES[loss_type], normalizer=normalizer), per_token)
    k3 = kl_k3(on_policy, batch["ref"])
    torch.testing.assert_close(_grad(loss, logprobs) + beta * k3 * weight, _grad(trl_loss, logprobs),
                               atol=1e-6, rtol=0)


def test_grpo_reduction_with_an_empty_response_differs_from_trl_by_the_row_count():
    # TRL: Σ_b mean_b / B (an empty row's mean is 0/1 = 0 but counts); ours: Σ_b mean_b / (B − 1).
    batch = _batch(seed=4)
    batch["mask"][2] = False
    loss, _ = _our_grpo_loss("grpo", batch, [torch.arange(B)], beta=0.04)
    trl_loss, _ = _trl_grpo_loss("grpo", batch["logprobs"], batch["old"], batch["ref"], batch["advantages"],
                                 batch["mask"], beta=0.04)
    torch.testing.assert_close(loss, trl_loss * B / (B - 1), atol=1e-6, rtol=0)


def _trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Copied from trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions,
    multi_objective_aggregation="sum_then_normalize" (the default), scale_rewards "group" / "none"."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if num_generations > 1:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("scale", [True, False])
def test_group_normalized_advantages_match_trl(scale, num_generations):
    g = torch.Generator().manual_seed(num_generations)
    rewards = torch.rand(6 * num_generations, generator=g)
    rewards[:num_generations] = 0.5                     # a group of equal rewards: advantage exactly 0
    rewards[num_generations: 2 * num_generations] = torch.rand(num_generations, generator=g).round()  # 0/1
    # GRPOConfig maps scale_rewards True → "group", False → "none" (trl/trainer/grpo_config.py).
    expected = _trl_grpo_advantages(rewards, num_generations, "group" if scale else "none")
    ours = group_normalized_advantages(rewards, group_size=num_generations, scale=scale)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert torch.equal(ours[:num_generations], torch.zeros(num_generations))


def _trl_rloo_advantages(scores, old_per_token_logps, ref_per_token_logps, completion_mask, *, beta,
                         num_generations):
    """Copied from trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions
    (no reward clipping, normalize_advantages=False: the defaults)."""
    rewards = scores.clone()
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("num_generations", [2, 4])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_leave_one_out_advantages_with_kl_in_the_reward_match_trl(beta, num_generations):
    g = torch.Generator().manual_seed(num_generations)
    batch = _batch(seed=5, rows=4 * num_generations)
    scores = torch.rand(4 * num_generations, generator=g)
    old, ref, mask = batch["old"].float(), batch["ref"].float(), batch["mask"]
    expected = _trl_rloo_advantages(scores, old, ref, mask.long(), beta=beta, num_generations=num_generations)
    # Stages 4 and 5 of trainers/grpo.train with kl_in_reward.
    rewards = scores - beta * masked_sum(kl_k1(old, ref), mask, dim=-1)
    ours = leave_one_out_advantages(rewards, group_size=num_generations, scale=False)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def _trl_rloo_loss(logprobs, old_logps, advantages, mask):
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *_, **__: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, model=SimpleNamespace(training=True),
        accelerator=ACCELERATOR, _metrics=defaultdict(lambda: defaultdict(list)),
    )
    rows = mask.shape[0]
    inputs = {"prompt_ids": torch.ones(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.zeros(rows, A, dtype=torch.long), "completion_mask": mask.long(),
              "old_logps": old_logps, "advantages": advantages}
    return rloo_trainer.RLOOTrainer._compute_loss(trainer, None, inputs)


def test_on_policy_rloo_loss_relates_to_trl_by_response_length():
    # On-policy both ratios are 1. TRL: −mean_b A_b·exp(Σ_t log π − Σ_t log π_old), so
    # ∂/∂log π_bt = −A_b / B. Ours (loss_type grpo): −Σ_b mean_t(A_b·ρ_bt) / B, so
    # ∂/∂log π_bt = −A_b / (B·|o_b|), and both values are −mean_b A_b.
    batch = _batch(seed=6)
    logprobs, mask = batch["logprobs"], batch["mask"]
    on_policy = logprobs.detach()
    loss, _ = _our_grpo_loss("grpo", batch, [torch.arange(B)], beta=0.0, old=on_policy)
    trl_loss = _trl_rloo_loss(logprobs, (on_policy * mask).sum(1), batch["advantages"], mask)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    lengths = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(_grad(loss, logprobs) * lengths, _grad(trl_loss, logprobs), atol=1e-6, rtol=0)
