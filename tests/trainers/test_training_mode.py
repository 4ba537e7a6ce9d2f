"""Every trainer trains its network in training mode, so `--gradient-checkpointing` (and LoRA's
dropout in SFT and the reward model) take effect.

transformers' `from_pretrained` returns a model in eval mode, and its decoder layers checkpoint
only when `self.training` is set; a trainer that forgot `.train()` trained with checkpointing
silently off. Counted here: calls of the decoder layers' MLP made with gradients enabled (the MLP
rather than the layer: transformers checkpoints the layer's `forward` and replays it without
`__call__`). With checkpointing, backward replays each such call once more: the count doubles.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

import test_dpo
import test_grpo
import test_kto
import test_ppo
import test_reward
import test_sft
from posttrain.trainers import dpo, grpo, kto, ppo, reward, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def run_sft(tmp_path, name, **kw):
    data = test_sft.write_jsonl(tmp_path / "sft.jsonl", test_sft.toy_records(8))
    sft.train(test_sft.config(tmp_path, name, data, max_steps=2, batch_size=4, **kw))


def run_reward(tmp_path, name, **kw):
    data = test_reward.write_jsonl(tmp_path / "rm.jsonl", test_reward.case_records(8, random.Random(0)))
    reward.train(test_reward.config(tmp_path, name, data, max_steps=2, batch_size=4, **kw))


def run_dpo(tmp_path, name, **kw):
    data = test_dpo.write_jsonl(tmp_path / "dpo.jsonl", test_dpo.toy_pairs(8))
    dpo.train(test_dpo.config(tmp_path, name, data, max_steps=2, batch_size=4, **kw))


def run_kto(tmp_path, name, **kw):
    data = test_kto.write_jsonl(tmp_path / "kto.jsonl", test_kto.toy_feedback(8))
    kto.train(test_kto.config(tmp_path, name, data, max_steps=2, batch_size=4, **kw))


def run_ppo(tmp_path, name, **kw):
    ppo.train(test_ppo.config(tmp_path, name, max_steps=1, **kw))


def run_grpo(tmp_path, name, **kw):
    grpo.train(test_grpo.config(tmp_path, name, max_steps=1, **kw))


RUNS = {"sft": run_sft, "rm": run_reward, "dpo": run_dpo, "kto": run_kto, "ppo": run_ppo, "grpo": run_grpo}


def layer_calls(monkeypatch, run, tmp_path: Path, name: str, **kw) -> list[bool]:
    """`self.training` of every decoder-layer MLP call made with gradients enabled during the run."""
    calls: list[bool] = []
    forward = LlamaMLP.__call__

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "__call__", counted)
    run(tmp_path, name, **kw)
    monkeypatch.setattr(LlamaMLP, "__call__", forward)
    return calls


@pytest.mark.parametrize("trainer", sorted(RUNS))
def test_trained_layers_run_in_training_mode_and_checkpointing_recomputes(monkeypatch, tmp_path, tiny_path, trainer):
    plain = layer_calls(monkeypatch, RUNS[trainer], tmp_path, "plain")
    checkpointed = layer_calls(monkeypatch, RUNS[trainer], tmp_path, "checkpointed", gradient_checkpointing=True)
    assert plain and all(plain), f"{trainer}: {plain.count(False)} of {len(plain)} layer calls in eval mode"
    assert all(checkpointed)
    assert len(checkpointed) == 2 * len(plain)
