"""Issue 15 §8: one metric name per quantity, choice lists that are their registries' keys, PPO's
pinned fields and its global batch, and the dead code gone."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from posttrain import ops
from posttrain.config import (DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RMConfig, SFTConfig, ConfigError,
                              build_config, field_docs)
from posttrain.data import Batch
from posttrain.losses.dpo import DPOLoss

ROOT = Path(__file__).resolve().parents[2]
BASE = {"data": "d.jsonl"}
PPO = {**BASE, "reward_fn": "m:f"}
GRPO = {**BASE, "judges": "fn:m:f"}


def metric_keys(folder: str) -> set[str]:
    """String literals shaped like metric keys ("a/b", "eval/a/b") in the package's sources under folder."""
    found = set()
    for path in (ROOT / "posttrain" / folder).glob("*.py"):
        found |= set(re.findall(r"[\"']((?:eval/)?[a-z]+/[a-z0-9_]+)[\"']", path.read_text()))
    return found


def test_one_name_per_quantity():
    # Before: the PPO loss said "policy/approx_kl" and "value/clipfrac", the PPO and GRPO logs
    # "policy/approxkl" and "val/clipfrac"; the reward model's eval said "eval/accuracy" where DPO's
    # said "eval/rewards/accuracy" (the loss's key "rewards/accuracy" under eval/).
    losses, trainers = metric_keys("losses"), metric_keys("trainers")
    spelled = {}
    for key in losses | trainers:
        plain = key.replace("_", "").replace("val/", "value/")
        spelled.setdefault(plain, set()).add(key)
    assert [names for names in spelled.values() if len(names) > 1] == []
    # A held-out statistic is the training key under eval/: no eval key may end as a loss key
    # does without being that key.
    for key in (k.removeprefix("eval/") for k in trainers if k.startswith("eval/")):
        twins = [loss_key for loss_key in losses if loss_key.split("/")[-1] == key.split("/")[-1]]
        assert twins in ([], [key]), (key, twins)
    assert {"policy/approx_kl", "eval/rewards/accuracy", "eval/rewards/margin"} <= trainers


def test_loss_statistics_are_logged_under_their_own_names():
    # The trainers fold the loss functions' stats dicts into the log instead of renaming entries.
    for name in ("ppo", "grpo"):
        source = (ROOT / "posttrain" / "trainers" / f"{name}.py").read_text()
        assert re.search(r"for key, value in (\{\*\*pg_stats, \*\*vf_stats\}|stats)\.items\(\):", source), name


@pytest.mark.parametrize("cls, base, field, registry", [
    (DPOConfig, BASE, "loss", "posttrain.losses.dpo.DPO_LOSSES"),
    (PPOConfig, PPO, "kl_estimator", "posttrain.losses.kl.KL_ESTIMATORS"),
    (SFTConfig, BASE, "precision", "posttrain.models.precision.PRECISIONS"),
    (SFTConfig, BASE, "overlong", "posttrain.data.load.OVERLONG"),
    (RMConfig, BASE, "pairing", "posttrain.data.formats.PAIRINGS"),
    (DPOConfig, BASE, "pairing", "posttrain.data.formats.PAIRINGS"),
    (KTOConfig, BASE, "pairing", "posttrain.data.formats.PAIRINGS"),
])
def test_choice_lists_are_the_registries_keys(cls, base, field, registry, monkeypatch):
    module, name = registry.rsplit(".", 1)
    keys = list(getattr(__import__(module, fromlist=[name]), name))
    for key in keys:  # every registered choice is accepted (k2 was refused: "is not one of k1, k3")
        assert getattr(build_config(cls, None, {**base, field: key}), field) == key
        assert key in field_docs(cls)[field], f"{cls.__name__}.{field}'s doc does not list {key!r}"
    with pytest.raises(ConfigError, match=f"{field}='nope' is not one of {', '.join(keys)}"):
        build_config(cls, None, {**base, field: "nope"})
    # A new registry entry is selectable with no second list to update.
    registered = getattr(__import__(module, fromlist=[name]), name)
    if isinstance(registered, dict):
        monkeypatch.setitem(registered, "new", next(iter(registered.values())))
    else:
        monkeypatch.setattr(module + "." + name, (*registered, "new"))
    assert getattr(build_config(cls, None, {**base, field: "new"}), field) == "new"


@pytest.mark.parametrize("cls, base", [(PPOConfig, PPO), (GRPOConfig, GRPO)])
def test_online_configs_refuse_the_inherited_values_they_cannot_honour(cls, base):
    with pytest.raises(ConfigError, match="overlong='truncate' must be drop: prompts are never truncated"):
        build_config(cls, None, {**base, "overlong": "truncate"})
    with pytest.raises(ConfigError, match="grad_accum=2 must be 1"):
        build_config(cls, None, {**base, "grad_accum": 2})
    docs = field_docs(cls)
    assert "prompt" in docs["max_length"] and "dropped" in docs["overlong"] and "Must stay 1" in docs["grad_accum"]


def test_global_batch_uses_its_world_size():
    ppo = build_config(PPOConfig, None, {**PPO, "rollout_batch_size": 16, "num_minibatches": 2, "batch_size": 2})
    assert [ppo.global_batch(w) for w in (1, 2, 4)] == [8, 8, 8]
    with pytest.raises(ConfigError, match="a minibatch of 8 rollouts .* does not divide over 3 processes"):
        ppo.global_batch(3)  # before: 8, as if three processes could share eight rollouts
    grpo = build_config(GRPOConfig, None, {**GRPO, "rollout_batch_size": 4, "num_generations": 4, "batch_size": 2})
    assert [grpo.global_batch(w) for w in (1, 2, 4)] == [16, 16, 16]
    with pytest.raises(ConfigError, match="rollout_batch_size=4 prompts do not divide over 3 processes"):
        grpo.global_batch(3)


def test_dead_code_is_gone():
    # Used only by tests: the live log-prob path is posttrain.losses.chunked_logprobs.
    assert not hasattr(ops, "token_logprobs") and not hasattr(ops, "_TokenLogprobs")
    assert "includes_nll" not in {f.name for f in dataclasses.fields(DPOLoss)}
    assert "segment_ids" not in {f.name for f in dataclasses.fields(Batch)}
