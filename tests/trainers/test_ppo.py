"""PPO trainer: few steps with a reward function and with a reward model (LoRA, value head),
learning on a verifiable toy task, exact resume after SIGTERM, config errors."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, PPOConfig, build_config, to_yaml
from posttrain.models.reward import RewardModel
from posttrain.trainers import ppo

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def lowercase_fraction(prompts, responses):
    """Dense toy reward: share of response characters that are lowercase letters."""
    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]


def digit_fraction(prompts, responses):
    """Verifiable toy reward: share of response characters that are digits (≈ 10/97 at random)."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["".join(rng.choice("bcdefghijk") for _ in range(rng.randint(2, 6))) for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return path


def config(tmp_path: Path, name: str, **kw) -> PPOConfig:
    base = dict(model="tiny-random", reward_fn=f"{__name__}:lowercase_fraction",
                data=str(write_prompts(tmp_path / "prompts.jsonl", 16)), output_dir=str(tmp_path / name),
                precision="fp32", lr=3e-3, warmup_ratio=0.0, lr_scheduler="constant", max_new_tokens=8,
                rollout_batch_size=8, num_minibatches=2, batch_size=2, ppo_epochs=2, samples_steps=1)
    base.update(kw)
    return build_config(PPOConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def captured(monkeypatch):
    """The (policy + value, reference) networks a run builds, to inspect after training."""
    built = []
    original = ppo.build_networks
    monkeypatch.setattr(ppo, "build_networks", lambda cfg: built.append(original(cfg)) or built[-1])
    return built


def test_few_steps_with_a_reward_function(tmp_path, tiny_path, captured):
    # One epoch, one minibatch: the update's first forward is the rollout policy itself, so
    # the ratio is exactly 1 (log π_old recomputed as training computes it).
    out = ppo.train(config(tmp_path, "fn", max_steps=3, num_minibatches=1, batch_size=4, ppo_epochs=1))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = ["objective/scores", "objective/kl", "objective/entropy", "objective/kl_coef", "policy/clipfrac",
            "policy/approx_kl", "value/clipfrac", "loss/policy", "loss/value", "value/returns", "value/error",
            "rollout/response_length", "time/rollout", "time/update", "perf/episodes_per_s"]
    assert all(math.isfinite(r[k]) for r in rows for k in keys)
    assert rows[0]["objective/kl"] == 0 and rows[0]["policy/approx_kl"] < 1e-7 and rows[0]["policy/clipfrac"] == 0
    assert rows[-1]["objective/kl"] != 0
    start = load_file(str(tiny_path / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(start[k], after[k]) for k in start)
    net, reference = captured[0]
    reference_weights = reference.state_dict()
    for name, value in start.items():
        assert torch.equal(reference_weights[name], value), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8 and {"prompt", "response", "score", "ended"} <= samples[0].keys()
    assert samples[0]["score"] == pytest.approx(lowercase_fraction([], [samples[0]["response"]])[0], abs=1e-6)


def test_few_steps_with_a_reward_model_lora_policy_and_lora_critic(tmp_path, tiny_path, captured):
    # The critic starts as the reward model; the reference is the LoRA policy with adapters off.
    rm_dir = RewardModel.from_causal_lm(str(tiny_path), seed=1).save_pretrained(tmp_path / "rm")
    out = ppo.train(config(tmp_path, "ppo_rm", reward_fn="", reward_model=str(rm_dir), max_steps=2, lora_r=4,
                           lora_alpha=8, critic_lora_r=4, missing_eos_penalty=1.0, normalize_scores=True,
                           score_clip=3.0))
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"] + r["loss/value"]) for r in rows)
    net, reference = captured[0]
    assert reference is None
    base = load_file(str(tiny_path / "model.safetensors"))
    policy = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in net.policy.state_dict().items() if "lora_" not in k}
    for name, value in base.items():
        assert torch.equal(policy[name], value), name
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in net.policy.state_dict().items())
    rm = RewardModel.from_pretrained(rm_dir).eval()
    critic_head = net.critic.reward_model.head.modules_to_save["default"].weight
    assert not torch.equal(critic_head, rm.head.weight)
    # Samples are raw reward-model scores; an ended reply scores as its text does.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    expected = rm.score([[{"role": "user", "content": s["prompt"]}] for s in samples], [s["response"] for s in samples])
    for sample, score in zip(samples, expected.tolist()):
        if sample["ended"] and sample["response"].isprintable():
            assert sample["score"] == pytest.approx(score, abs=1e-4)


def test_value_head_on_the_policy_and_early_stop(tmp_path):
    # early_stop_kl tiny: epoch 1's first minibatch has approx KL 0 (ratio 1), its second
    # does not, so every iteration stops after one of its four epochs.
    out = ppo.train(config(tmp_path, "head", max_steps=2, value_head=True, ppo_epochs=4, early_stop_kl=1e-12,
                           adaptive_kl_target=1.0, kl_estimator="k3"))
    rows = metrics(out)
    assert [r["policy/epochs"] for r in rows] == [1, 1]
    assert rows[1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]


def test_policy_learns_a_verifiable_toy_task(tmp_path):
    # Reward = share of digits in the reply (≈ 0.06 for the random model on held-out
    # prompts). 10 iterations × 32 rollouts must raise the held-out mean clearly while the
    # per-response KL to the reference (Σ_t log π/π_ref, k1) stays under 6 nats.
    train_prompts = write_prompts(tmp_path / "train.jsonl", 64, seed=0)
    eval_prompts = write_prompts(tmp_path / "eval.jsonl", 16, seed=1)
    cfg = config(tmp_path, "learn", reward_fn=f"{__name__}:digit_fraction", data=str(train_prompts),
                 eval_data=str(eval_prompts), max_steps=10, rollout_batch_size=32, batch_size=16, ppo_epochs=4,
                 kl_coef=0.05, samples_steps=0)
    out = ppo.train(cfg)
    evals = [r for r in metrics(out) if "eval/scores" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["eval/kl"] == 0 and last["step"] == 10
    assert first["eval/scores"] < 0.12
    assert last["eval/scores"] > first["eval/scores"] + 0.2, evals
    assert 0 < last["eval/kl"] < 6.0, evals


def test_resume_after_sigterm_reproduces_the_uninterrupted_run(tmp_path, spawn):
    steps = 6
    kw = dict(max_steps=steps, reward_fn="test_ppo:lowercase_fraction", adaptive_kl_target=0.5,
              normalize_scores=True)
    whole = ppo.train(config(tmp_path, "whole", **kw))
    cut = config(tmp_path, "cut", **kw)
    (tmp_path / "cut.yaml").write_text(to_yaml(cut))
    cmd = [sys.executable, "-m", "posttrain.cli", "ppo", "--config", str(tmp_path / "cut.yaml")]
    env = {"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    log = Path(cut.output_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Resume with: posttrain ppo" in output
    assert len(log.read_text().splitlines()) < steps, "the run finished before the signal arrived"
    sys.path.insert(0, str(HERE))
    resumed = ppo.train(build_config(PPOConfig, str(Path(cut.output_dir) / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for key, value in x.items():
            if not key.startswith(("time/", "perf/")):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (x["step"], key)


def test_sizes_must_divide_exactly(tmp_path):
    with pytest.raises(ConfigError, match="rollout_batch_size=10 does not divide into num_minibatches=4"):
        config(tmp_path, "x", rollout_batch_size=10, num_minibatches=4)
    with pytest.raises(ConfigError, match="micro-batches of batch_size=3"):
        config(tmp_path, "x", rollout_batch_size=8, num_minibatches=1, batch_size=3)
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        config(tmp_path, "x").sizes(3)
    with pytest.raises(ConfigError, match="exactly one"):
        config(tmp_path, "x", reward_model="rm")
    assert config(tmp_path, "x", rollout_batch_size=16, num_minibatches=2, batch_size=2).sizes(2) == (8, 4, 2)


def test_two_processes_run_and_whiten_over_all_rollouts(tmp_path):
    # Multi-process PPO end to end (torchrun, gloo): every collective in the loop lines up —
    # global token counts, advantage whitening over both processes' rollouts, metrics.
    cfg = config(tmp_path, "ddp", max_steps=2)
    (tmp_path / "ddp.yaml").write_text(to_yaml(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", "ppo", "--config", str(tmp_path / "ddp.yaml")]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    # Imported here: the ranks import this file as the reward function's module, without tests/ on their path.
    from process_groups import run_group

    result = run_group(cmd, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = metrics(Path(cfg.output_dir))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["objective/scores"]) for r in rows)
