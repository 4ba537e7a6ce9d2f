"""Property-based tests (hypothesis) of the loss family at the edges of its inputs (issue 15, §1
and Proof): log-probs anywhere in [−1e6, 0] (exactly 0 included: P = 1 is reachable in float32),
huge rewards, advantages and margins, masked rows full of garbage. Every loss is finite in value
and gradient, and moves the way its objective says ("higher advantage → lower loss", the chosen
reply's log-prob pulled up, clipping on both sides). The explicit edge grids stay in
test_loss_boundaries.py; these search between them. At most 100 derandomized examples each.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from posttrain.data.formats import FLOAT32_MAX
from posttrain.losses import (DPO_LOSSES, bradley_terry_loss, grpo_loss, kl_k1, kl_k2, kl_k3, kto_loss,
                              ppo_policy_loss, value_loss)
from posttrain.losses.ppo import LOG_RATIO_CAP
from posttrain.ops import aggregate

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None)

EDGE_LOGPROBS = [0.0, -0.0, -1e-45, -1e-9, -1e-3, -0.6931472, -1.0, -1e6]
"""Exactly 0 and −0, a denormal, a confident model's −1e-9, the switch points of log1mexp
(−log 2) and ORPO's near/far forms (−1), the most negative sum in the range."""
logprob = st.one_of(st.floats(min_value=-1e6, max_value=0.0, width=32), st.sampled_from(EDGE_LOGPROBS))
huge = st.one_of(st.floats(min_value=-1e15, max_value=1e15), st.sampled_from([0.0, 1e15, -1e15]))


def columns(n_columns: int, element=logprob, max_rows: int = 6):
    """n_columns lists of the same length (1..max_rows) drawn from `element`."""
    return st.integers(1, max_rows).flatmap(
        lambda n: st.tuples(*[st.lists(element, min_size=n, max_size=n) for _ in range(n_columns)]))


def leaves(*cols: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(c, dtype=torch.float32, requires_grad=True) for c in cols]


def assert_finite(name: str, loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """The loss and the gradient of its sum w.r.t. every input are finite; else name the inputs."""
    loss.sum().backward()
    values = {"loss": loss.detach(), **{f"grad{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None}}
    for what, tensor in values.items():
        assert torch.isfinite(tensor).all(), f"{name}: {what} not finite {tensor.tolist()} at " \
                                             f"{[x.detach().tolist() for x in inputs]}"


# ---------------------------------------------------------------- the DPO family


def preference_loss(name: str, chosen, rejected, ref_chosen, ref_rejected, *, beta: float, hyper: dict):
    spec = DPO_LOSSES[name]
    kwargs = {k: hyper[k] for k in spec.hyperparameters}
    refs = (ref_chosen, ref_rejected) if spec.needs_reference else (None, None)
    return spec.fn(chosen, rejected, *refs, beta=beta, **kwargs)[0]


hyperparameters = st.fixed_dictionaries({"label_smoothing": st.floats(0.0, 0.49), "gamma": st.floats(0.0, 10.0)})
betas = st.sampled_from([0.01, 0.1, 1.0, 10.0])


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
@PROPERTY
@given(cols=columns(4), beta=betas, hyper=hyperparameters)
@example(cols=([-1e-9], [-1.3], [-1.0], [-1.0]), beta=0.1, hyper={"label_smoothing": 0.0, "gamma": 0.5})
@example(cols=([0.0], [0.0], [0.0], [0.0]), beta=10.0, hyper={"label_smoothing": 0.1, "gamma": 0.5})
@example(cols=([0.0], [-1e6], [-1e6], [0.0]), beta=10.0, hyper={"label_smoothing": 0.49, "gamma": 10.0})
def test_every_preference_loss_is_finite_in_value_and_gradient(name, cols, beta, hyper):
    inputs = leaves(*cols)
    assert_finite(name, preference_loss(name, *inputs, beta=beta, hyper=hyper), inputs)


MONOTONE = ("sigmoid", "hinge", "simpo", "orpo")
"""Losses that only ever pull the chosen log-prob up and push the rejected one down. cDPO and
rDPO with label smoothing have an optimum at a finite margin, and IPO regresses the margin onto
1/(2β), so for them a higher chosen log-prob can raise the loss."""


@pytest.mark.parametrize("name", MONOTONE)
@PROPERTY
@given(cols=columns(4), beta=betas, gamma=st.floats(0.0, 10.0))
def test_a_preference_loss_never_pushes_the_chosen_reply_down(name, cols, beta, gamma):
    chosen, rejected, ref_chosen, ref_rejected = inputs = leaves(*cols)
    loss = preference_loss(name, *inputs, beta=beta, hyper={"label_smoothing": 0.0, "gamma": gamma})
    loss.sum().backward()
    assert (chosen.grad <= 0).all() and (rejected.grad >= 0).all(), (cols, chosen.grad, rejected.grad)


# ---------------------------------------------------------------- reward model and KTO


@PROPERTY
@given(cols=columns(3, st.floats(min_value=-1e30, max_value=1e30)),
       margin_scale=st.sampled_from([0.0, 1.0, 1e30, FLOAT32_MAX]))
def test_bradley_terry_is_finite_and_pulls_the_chosen_reward_up(cols, margin_scale):
    # Margins are validated to float32's range (formats.FLOAT32_MAX), so the largest one is a
    # legal input; rewards up to ±1e30 stand for any head output the training could reach.
    chosen, rejected, unit = cols
    chosen, rejected = leaves(chosen, rejected)
    margin = (torch.tensor(unit) / 1e30 * margin_scale).clamp(-FLOAT32_MAX, FLOAT32_MAX)
    loss, stats = bradley_terry_loss(chosen, rejected, margin=margin)
    assert_finite("bradley_terry", loss, [chosen, rejected])
    assert (chosen.grad <= 0).all() and (rejected.grad >= 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


@PROPERTY
@given(cols=columns(2), labels=st.lists(st.booleans(), min_size=6, max_size=6),
       z0=st.one_of(st.floats(0.0, 1e6, width=32), st.just(0.0)), beta=betas)
def test_kto_is_finite_and_moves_each_label_its_way(cols, labels, z0, beta):
    policy, ref = leaves(*cols)
    desirable = torch.tensor(labels[:policy.shape[0]])
    loss, _ = kto_loss(policy, ref, desirable, torch.tensor(z0), beta=beta, desirable_weight=1.0,
                       undesirable_weight=1.33)
    assert_finite("kto", loss, [policy, ref])
    assert (policy.grad[desirable] <= 0).all() and (policy.grad[~desirable] >= 0).all()


# ---------------------------------------------------------------- PPO, GRPO and the KL estimators


@PROPERTY
@given(cols=columns(2),
       advantages=st.integers(1, 6).flatmap(lambda n: st.lists(huge, min_size=n, max_size=n)),
       clip_eps=st.floats(0.01, 0.5), clip_high=st.one_of(st.none(), st.floats(0.01, 0.5)))
@example(cols=([0.0], [-1e6]), advantages=[1e15], clip_eps=0.2, clip_high=None)
@example(cols=([-1e6], [0.0]), advantages=[-1e15], clip_eps=0.2, clip_high=0.28)
@example(cols=([-0.5, -0.5], [-0.6, -0.4]), advantages=[1.0, -1.0], clip_eps=0.05, clip_high=None)
def test_ppo_loss_is_finite_clips_on_both_sides_and_falls_with_the_advantage(cols, advantages, clip_eps, clip_high):
    n = min(len(cols[0]), len(advantages))
    logprobs = torch.tensor(cols[0][:n], requires_grad=True)
    old, adv = torch.tensor(cols[1][:n])[None], torch.tensor(advantages[:n])[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    loss, stats = ppo_policy_loss(logprobs[None], old, adv, mask, clip_eps=clip_eps, clip_eps_high=clip_high)
    assert_finite("ppo_policy", loss, [logprobs])
    assert all(torch.isfinite(v) for v in stats.values())
    # Clipping on both sides: no gradient where the ratio is past the clip in the direction the
    # advantage pushes it (A > 0, ρ > 1 + ε_high; A < 0, ρ < 1 − ε), or past the log-ratio cap;
    # elsewhere the gradient of −A·ρ w.r.t. log π is −A·ρ.
    log_ratio = (logprobs.detach() - old[0]).double()
    ratio, a = log_ratio.exp(), adv[0].double()
    high = clip_eps if clip_high is None else clip_high
    frozen = ((a > 0) & (ratio > 1 + high)) | ((a < 0) & (ratio < 1 - clip_eps)) | (log_ratio.abs() > LOG_RATIO_CAP)
    expected = torch.where(frozen | (a == 0), 0.0, -a * ratio)
    torch.testing.assert_close(logprobs.grad.double(), expected, rtol=1e-4, atol=1e-30)
    # Higher advantage → lower (or equal) loss, token by token, at the same ratio.
    raised, _ = ppo_policy_loss(logprobs.detach()[None], old, adv + adv.abs() + 1.0, mask, clip_eps=clip_eps,
                                clip_eps_high=clip_high)
    assert (raised <= loss.detach()).all(), (raised, loss)


@PROPERTY
@given(cols=columns(3, huge), clip_eps=st.floats(0.01, 10.0),
       mask=st.lists(st.booleans(), min_size=6, max_size=6),
       garbage=st.sampled_from([math.nan, math.inf, -math.inf, 1e38]))
def test_value_loss_is_finite_and_masked_tokens_give_nothing(cols, clip_eps, mask, garbage):
    values, old, returns = (torch.tensor(c)[None] for c in cols)
    include = torch.tensor(mask[:values.shape[1]])[None]
    values = torch.where(include, values, garbage).requires_grad_()
    old, returns = (torch.where(include, t, garbage) for t in (old, returns))
    loss, stats = value_loss(values, old, returns, include, clip_eps=clip_eps)
    total = aggregate(loss, include)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(values.grad).all() and torch.isfinite(stats["value/clipfrac"])
    assert (loss.detach() >= 0).all() and (loss.detach()[~include] == 0).all() and (values.grad[~include] == 0).all()


@PROPERTY
@given(cols=columns(3), advantages=st.lists(huge, min_size=6, max_size=6), beta=st.sampled_from([0.0, 0.04, 1.0]),
       mask=st.lists(st.booleans(), min_size=6, max_size=6))
@example(cols=([0.0, -1e6], [-1e6, 0.0], [-1e6, 0.0]), advantages=[1e15, -1e15] * 3, beta=1.0, mask=[True, False] * 3)
def test_grpo_loss_is_finite_with_any_reference_and_any_mask(cols, advantages, beta, mask):
    logprobs, old, ref = (torch.tensor(c)[None] for c in cols)
    n = logprobs.shape[1]
    include = torch.tensor(mask[:n])[None]
    logprobs = torch.where(include, logprobs, math.nan).requires_grad_()  # padding garbage
    loss, stats = grpo_loss(logprobs, old, torch.tensor(advantages[:n])[None], include, ref, clip_eps=0.2,
                            beta=beta)
    total = aggregate(loss, include)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logprobs.grad).all(), (cols, total, logprobs.grad)
    assert (logprobs.grad[~include] == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


@PROPERTY
@given(cols=columns(2))
def test_the_kl_estimators_are_finite_and_k2_k3_non_negative(cols):
    for estimator in (kl_k1, kl_k2, kl_k3):
        logprobs, ref = leaves(*cols)
        kl = estimator(logprobs, ref)
        assert_finite(estimator.__name__, kl, [logprobs, ref])
        if estimator is not kl_k1:
            assert (kl.detach() >= 0).all(), (estimator.__name__, cols, kl)
