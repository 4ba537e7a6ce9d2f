"""GRPO / RLOO trainer: few steps (reward functions, a reward model, LoRA + KL), learning on a
verifiable toy task, exact resume after SIGTERM, config errors."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, GRPOConfig, RLOOConfig, build_config, to_yaml
from posttrain.models.reward import RewardModel
from posttrain.sampling import Generation
from posttrain.trainers import grpo

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def digit_fraction(prompts, responses):
    """Verifiable toy reward: share of response characters that are digits (≈ 0.1 at random)."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def length_bonus(prompts, responses):
    return [min(len(r), 8) / 8 for r in responses]


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["".join(rng.choice("bcdefghijk") for _ in range(rng.randint(2, 6))) for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return path


def config(tmp_path: Path, name: str, cls=GRPOConfig, **kw):
    base = dict(model="tiny-random", judges=f"fn:{__name__}:digit_fraction",
                data=str(write_prompts(tmp_path / "prompts.jsonl", 16)), output_dir=str(tmp_path / name),
                precision="fp32", lr=3e-3, warmup_ratio=0.0, lr_scheduler="constant", max_new_tokens=8,
                rollout_batch_size=4, num_generations=4, batch_size=4, samples_steps=1)
    base.update(kw)
    return build_config(cls, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def captured(monkeypatch):
    """The (policy, reference) networks a run builds, to inspect after training."""
    built = []
    original = grpo.build_networks
    monkeypatch.setattr(grpo, "build_networks", lambda cfg: built.append(original(cfg)) or built[-1])
    return built


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_few_steps_with_two_weighted_reward_functions(tmp_path, captured, loss_type):
    # μ = 1 and one minibatch: the update's ratio is exactly 1, so nothing is clipped.
    start = {k: v.clone() for k, v in grpo.load_causal_lm("tiny-random").state_dict().items()}
    cfg = config(tmp_path, loss_type, max_steps=3, loss_type=loss_type, drop_zero_variance=True,
                 judges=f"fn:{__name__}:digit_fraction, fn:{__name__}:length_bonus", judge_weights="1,0.5")
    out = grpo.train(cfg)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(isinstance(v, (int, float)) and v == v for v in row.values())
        assert row["policy/clipfrac"] == 0 and row["policy/approx_kl"] == pytest.approx(0, abs=1e-6)
        # objective/scores is the weighted sum of the two judges' means.
        assert row["objective/scores"] == pytest.approx(
            row[f"rewards/fn:{__name__}:digit_fraction"] + 0.5 * row[f"rewards/fn:{__name__}:length_bonus"], abs=1e-5)
        assert 0 <= row["objective/zero_variance_groups"] <= 1
    policy, reference = captured[0]
    assert reference is None                                              # β = 0 loads none
    changed = [k for k, v in policy.policy.state_dict().items() if not torch.equal(v, start[k])]
    assert changed
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "response", "reward", "finish_reason"} <= set(samples[0])


def test_rloo_with_a_reward_model_lora_and_several_minibatches(tmp_path, tiny_path, captured):
    rm_dir = tmp_path / "rm"
    RewardModel.from_causal_lm(str(tiny_path), seed=1).save_pretrained(rm_dir)
    cfg = config(tmp_path, "rloo", cls=RLOOConfig, judges=f"rm:{rm_dir}", max_steps=2, lora_r=4, lora_alpha=8,
                 num_minibatches=2, batch_size=4, num_iterations=2)
    assert (cfg.advantage, cfg.kl_in_reward, cfg.beta) == ("rloo", True, 0.05)
    out = grpo.train(cfg)
    rows = metrics(out)
    assert len(rows) == 2 and all(r["objective/kl"] == r["objective/kl"] for r in rows)
    # The reward is the score minus β times the per-response KL (k1 under π_old).
    for row in rows:
        assert row["objective/rewards"] == pytest.approx(row["objective/scores"] - 0.05 * row["objective/kl"],
                                                         abs=1e-5)
    assert rows[0]["objective/kl"] == pytest.approx(0, abs=1e-6)         # the first batch: π = π_ref
    assert captured[0][1] is None                                         # LoRA: adapters off = π_ref
    assert (out / "model.safetensors").is_file()


def test_rloo_takes_log_pi_old_from_its_training_forward_as_a_separate_forward_would(tmp_path, monkeypatch):
    # μ = 1, one minibatch: micro-batches of whole groups (batch_size 4 = K) take the KL-shaped
    # reward from the training forward's own log-probs; batch_size 2 splits groups, so the same
    # run makes the separate no-grad forward. Rewards, KL (nonzero once the policy has moved)
    # and weights must agree, up to fp32 summation order.
    olds = []
    original = grpo.logprobs_of
    monkeypatch.setattr(grpo, "logprobs_of", lambda *a, old, **kw: olds.append(old) or original(*a, old=old, **kw))
    runs = {}
    for batch_size in (4, 2):
        olds.clear()
        cfg = config(tmp_path, f"b{batch_size}", cls=RLOOConfig, max_steps=3, batch_size=batch_size)
        assert grpo.shaped_in_training(cfg) == (batch_size == 4)
        out = grpo.train(cfg)
        assert olds == [batch_size == 2] * 3
        runs[batch_size] = (metrics(out), load_file(out / "model.safetensors"))
    (fused, fused_weights), (separate, separate_weights) = runs[4], runs[2]
    for a, b in zip(fused, separate):
        for key in ("objective/scores", "objective/rewards", "objective/kl", "objective/zero_variance_groups"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert abs(fused[-1]["objective/kl"]) > 1e-3
    for key, value in fused_weights.items():
        torch.testing.assert_close(value, separate_weights[key], atol=1e-5, rtol=1e-4, msg=key)


def test_kl_as_a_loss_term_keeps_the_reference_frozen(tmp_path, captured):
    grpo.train(config(tmp_path, "kl", max_steps=2, beta=0.1, num_iterations=2))
    policy, reference = captured[0]
    fresh = grpo.load_causal_lm("tiny-random").state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in reference.state_dict().items())
    rows = metrics(Path(tmp_path / "kl"))
    # k3 ≥ 0 always; the second pass of the first batch already differs from π_ref.
    assert all(r["policy/kl_k3"] >= 0 for r in rows) and rows[-1]["policy/kl_k3"] > 0


@pytest.mark.parametrize("cls, beta", [(GRPOConfig, 0.3), (RLOOConfig, 0.05)])
def test_learns_a_verifiable_toy_task_on_held_out_prompts(tmp_path, cls, beta):
    # Reward = share of digits in the reply (≈ 0.1 for the random model). 12 iterations of
    # 8 prompts × 8 samples must raise the mean reward on 16 held-out prompts clearly, with the
    # per-response KL to the starting model (Σ_t log π/π_ref) under 8 nats. Measured when
    # written: GRPO (β = 0.3, KL in the loss) 0.07 → 0.47 at KL 4.0; RLOO (β = 0.05, KL in the
    # reward, dr_grpo reduction) 0.07 → 0.66 at KL 6.7; ≈ 3 s each. (GRPO with β = 0.1 reached
    # 0.87 at KL 13.8.)
    cfg = config(tmp_path, "learn", cls=cls, data=str(write_prompts(tmp_path / "train.jsonl", 64)),
                 eval_data=str(write_prompts(tmp_path / "eval.jsonl", 16, seed=1)), max_steps=12,
                 rollout_batch_size=8, num_generations=8, batch_size=16, num_iterations=2, num_minibatches=2,
                 beta=beta, samples_steps=0)
    evals = [r for r in metrics(grpo.train(cfg)) if "eval/scores" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["eval/kl"] == pytest.approx(0, abs=1e-6) and last["step"] == 12
    assert first["eval/scores"] < 0.2
    assert last["eval/scores"] > first["eval/scores"] + 0.25, evals
    assert 0 < last["eval/kl"] < 8.0, evals


def test_resume_after_sigterm_reproduces_the_uninterrupted_run(tmp_path, spawn):
    steps = 6
    kw = dict(max_steps=steps, judges="fn:test_grpo:digit_fraction", num_iterations=2, beta=0.05)
    whole = grpo.train(config(tmp_path, "whole", **kw))
    cut = config(tmp_path, "cut", **kw)
    (tmp_path / "cut.yaml").write_text(to_yaml(cut))
    cmd = [sys.executable, "-m", "posttrain.cli", "grpo", "--config", str(tmp_path / "cut.yaml")]
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
    assert "Resume with: posttrain grpo" in output
    assert len(log.read_text().splitlines()) < steps, "the run finished before the signal arrived"
    sys.path.insert(0, str(HERE))
    resumed = grpo.train(build_config(GRPOConfig, str(Path(cut.output_dir) / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for key, value in x.items():
            if not key.startswith(("time/", "perf/")):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (x["step"], key)


def test_bad_settings_are_one_line_config_errors(tmp_path):
    for kw, message in ((dict(judges=""), "judges='' must name at least one scorer"),
                        (dict(judge_weights="1,2"), "must give one weight per judge \\(1\\)"),
                        (dict(judge_weights="x"), "must be comma-separated finite numbers"),
                        (dict(judge_weights="nan"), "must be comma-separated finite numbers"),
                        (dict(num_generations=1), "num_generations=1 must be ≥ 2"),
                        (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
                        (dict(loss_type="sum"), "loss_type='sum' is not one of grpo, dapo, dr_grpo"),
                        (dict(advantage="ppo"), "advantage='ppo' is not one of grpo, rloo"),
                        (dict(advantage="rloo", num_generations=1), "num_generations=1 must be ≥ 2"),
                        (dict(kl_in_reward=True), "kl_in_reward=True needs beta > 0"),
                        (dict(rollout_batch_size=3, num_minibatches=5), "12 responses per process do not "
                         "divide into num_minibatches=5"),
                        (dict(batch_size=3), r"minibatch of 16 responses does not divide into micro-batches of "
                                             r"batch_size=3; give a batch_size that divides 16 \(the largest below "
                                             r"it: 2\)")):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, "x", **kw)
    with pytest.raises(ConfigError, match="do not divide over 3 processes"):
        config(tmp_path, "x").sizes(3)
    assert config(tmp_path, "x", rollout_batch_size=4, num_generations=4, num_minibatches=2, batch_size=4).sizes(2) \
        == (2, 4, 1)


def hand_made_generation(prompts: list[list[int]], responses: list[list[int]], prompt_index: list[int],
                         steps: int) -> Generation:
    """Responses (each ≤ steps tokens) to prompts[prompt_index[b]], padded as the sampler pads."""
    from posttrain.sampling.sampler import left_pad

    prompt_ids, prompt_mask = left_pad([prompts[i] for i in prompt_index], 0)
    response_ids = torch.zeros(len(responses), steps, dtype=torch.long)
    response_mask = torch.zeros(len(responses), steps, dtype=torch.bool)
    for b, tokens in enumerate(responses):
        response_ids[b, :len(tokens)], response_mask[b, :len(tokens)] = torch.tensor(tokens), True
    B = len(responses)
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(B, steps), ["length"] * B,
                      torch.tensor(prompt_index), torch.zeros(B, dtype=torch.long), [""] * B, [""] * B)


def test_shared_prompt_rows_hold_each_prompt_once_and_every_response_token_at_its_column():
    gen = hand_made_generation([[5, 6, 7], [8]], [[1, 2], [3], [4, 4, 4], [9, 9]], [0, 1, 0, 0], steps=3)
    shared = gen.shared_prompt_rows()
    # Row 0: 5 6 7 | 1 2 | p=7 4 4 4 | p=7 9 9; row 1: 8 | 3, padded.
    assert shared.input_ids.tolist() == [[5, 6, 7, 1, 2, 7, 4, 4, 4, 7, 9, 9], [8, 3] + [0] * 10]
    assert shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 2, 3, 4]
    assert shared.members[0].int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                                                [1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
                                                [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert shared.members[1].int().tolist() == [[1, 1] + [0] * 10, [0] * 12, [0] * 12]
    taken = torch.where(gen.response_mask, shared.input_ids[shared.row[:, None], shared.columns], 0)
    assert torch.equal(taken, gen.response_ids)
    assert int(shared.target_mask.sum()) == int(gen.response_mask.sum())
    assert hand_made_generation([[5], [6]], [[1], [2]], [0, 1], steps=1).shared_prompt_rows() is None


@pytest.mark.parametrize("attention", ["posttrain_sdpa", "sdpa"])
def test_shared_prompt_log_probs_and_gradients_equal_a_row_a_response(tiny_model_and_tokenizer, attention):
    # Two prompts of different lengths (left padding), groups split and interleaved, responses
    # of 1 to 6 tokens: the same log-probs and parameter gradients as one row a response.
    from posttrain.models.value import PolicyAndValue

    model, _ = tiny_model_and_tokenizer
    model.config._attn_implementation = attention
    net = PolicyAndValue(model, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    gen = hand_made_generation([draw(9), draw(4)], [draw(n) for n in (6, 1, 3, 5, 6)], [0, 1, 0, 1, 0], steps=6)
    results = []
    for sharing in (True, False):
        net.zero_grad()
        logprobs = grpo.response_logprobs_of(net, gen, GRPOConfig(prefix_sharing=sharing), "cpu")
        (logprobs * torch.linspace(-1, 2, logprobs.numel()).view_as(logprobs)).sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in net.parameters()]))
    (shared, shared_grads), (plain, plain_grads) = results
    assert torch.equal(shared == 0, ~gen.response_mask)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_held_out_data_without_beta_computes_the_reference_for_evaluation_only(tmp_path, monkeypatch):
    # β = 0: training never reads log π_ref; only the held-out evaluation's KL does.
    calls = []
    original = grpo.logprobs_of
    monkeypatch.setattr(grpo, "logprobs_of", lambda *a, ref, **kw: calls.append(ref) or original(*a, ref=ref, **kw))
    grpo.train(config(tmp_path, "eval", max_steps=2, eval_data=str(write_prompts(tmp_path / "held.jsonl", 4, seed=1)),
                      eval_steps=1))
    assert calls.count(False) == 2 and calls.count(True) >= 2
