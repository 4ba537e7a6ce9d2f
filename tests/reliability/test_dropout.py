"""Passes whose log-probs are compared run without dropout (issue 15, §5): DPO, KTO, PPO, GRPO.

The tiny model is saved with attention_dropout 0.1 (applied by Llama's attention in train
mode through the functional form, not a Dropout module), and runs add LoRA with
lora_dropout 0.5. At the first update the policy equals its reference and π_old, so every
comparison must come out exact.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from posttrain.config import DPOConfig, GRPOConfig, KTOConfig, PPOConfig, build_config
from posttrain.models.tiny import build_tiny_model, build_tiny_tokenizer
from posttrain.trainers import dpo, grpo, kto, ppo

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(precision="fp32", warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1)


def lowercase_fraction(prompts, responses):
    """Dense toy reward: share of response characters that are lowercase letters."""
    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    """The seed-0 tiny model saved with attention_dropout 0.1."""
    folder = tmp_path_factory.mktemp("tiny-attention-dropout")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.attention_dropout = 0.1
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def pairs_file(tmp_path: Path, n: int = 8) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w + w}) + "\n"
                            for w in words))
    return path


def prompts_file(tmp_path: Path, n: int = 8) -> Path:
    rng = random.Random(0)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "".join(rng.choice("bcdefghijk") for _ in range(4))}) + "\n"
                            for _ in range(n)))
    return path


def first_row(folder: Path) -> dict:
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])


ADAPTERS = {"attention_dropout": {}, "lora_dropout": dict(lora_r=4, lora_dropout=0.5)}


@pytest.mark.parametrize("where", sorted(ADAPTERS))
def test_dpo_first_loss_is_ln2(tmp_path, dropout_model, where):
    # Policy = reference at step 1, so every margin is 0 and −log σ(0) = ln 2 = 0.693147; with
    # attention dropout on in the policy's pass it was 0.690696.
    cfg = build_config(DPOConfig, None, dict(BASE, model=dropout_model, data=str(pairs_file(tmp_path)),
                                             output_dir=str(tmp_path / "out"), lr=1e-3, max_length=64,
                                             max_steps=1, batch_size=4, **ADAPTERS[where]))
    row = first_row(dpo.train(cfg))
    assert row["loss/train"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["rewards/margin"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("where", sorted(ADAPTERS))
def test_kto_first_rewards_are_zero(tmp_path, dropout_model, where):
    # Policy = reference at step 1: every implied reward β·(log π_θ − log π_ref) is 0.
    cfg = build_config(KTOConfig, None, dict(BASE, model=dropout_model, data=str(pairs_file(tmp_path)),
                                             output_dir=str(tmp_path / "out"), lr=1e-3, max_length=64,
                                             max_steps=1, batch_size=4, **ADAPTERS[where]))
    row = first_row(kto.train(cfg))
    assert row["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert row["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert row["kl/z0"] == pytest.approx(0.0, abs=1e-6)


def approx_kl(row: dict) -> float:
    return row["policy/approxkl"] if "policy/approxkl" in row else row["policy/approx_kl"]


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# LoRA's B starts at 0, so adapter dropout changes nothing until the first update: the
# LoRA cases look at the second iteration, the attention-dropout ones at both.
SOURCES = {"attention_dropout": {}, "lora_dropout": dict(lora_r=4, lora_dropout=0.5)}


@pytest.mark.parametrize("where", sorted(SOURCES))
def test_ppo_first_minibatch_approxkl_is_zero(tmp_path, dropout_model, tiny_path, where):
    # One epoch, one minibatch: each iteration's update starts from the rollout policy itself,
    # so the ratio is exactly 1. Before: attention dropout was never disabled, and LoRA's
    # dropout was added after disable_dropout had run.
    model = dropout_model if where == "attention_dropout" else str(tiny_path)
    cfg = build_config(PPOConfig, None, dict(
        BASE, model=model, reward_fn=f"{__name__}:lowercase_fraction", data=str(prompts_file(tmp_path)),
        output_dir=str(tmp_path / "out"), lr=3e-3, max_new_tokens=8, rollout_batch_size=4, num_minibatches=1,
        batch_size=4, ppo_epochs=1, max_steps=2, value_head=True, **SOURCES[where]))
    logged = rows(ppo.train(cfg))
    assert [approx_kl(r) for r in logged] == [0.0, 0.0]
    assert all(r["policy/clipfrac"] == 0 for r in logged)


@pytest.mark.parametrize("where", sorted(SOURCES))
def test_grpo_old_logprobs_equal_the_first_update_pass(tmp_path, dropout_model, tiny_path, where):
    # kl_in_reward makes stage 3 compute log π_old; one minibatch, one pass: ratio exactly 1.
    model = dropout_model if where == "attention_dropout" else str(tiny_path)
    cfg = build_config(GRPOConfig, None, dict(
        BASE, model=model, judges=f"fn:{__name__}:lowercase_fraction", data=str(prompts_file(tmp_path)),
        output_dir=str(tmp_path / "out"), lr=3e-3, max_new_tokens=8, rollout_batch_size=2, num_generations=4,
        num_minibatches=1, batch_size=8, max_steps=2, kl_in_reward=True, beta=0.04, **SOURCES[where]))
    logged = rows(grpo.train(cfg))
    assert [approx_kl(r) for r in logged] == [0.0, 0.0]
