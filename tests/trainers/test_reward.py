"""Reward-model trainer: few steps, accumulation = one big batch, exact resume, LoRA, a
learning test, and bad data stopping the run."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from process_groups import run_group
from posttrain.config import RMConfig, build_config
from posttrain.data import TokenizedPair
from posttrain.models.reward import RewardModel
from posttrain.trainers import reward


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def case_records(n: int, rng: random.Random) -> list[dict]:
    """Preferred = the reply that obeys the instruction ("upper: w" → W, "lower: W" → w).

    The word comes in either case, so neither the word nor the reply's case alone predicts
    the preference: the model must read the instruction and the reply together.
    """
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        mode = rng.choice(["upper", "lower"])
        good, bad = (word.upper(), word) if mode == "upper" else (word, word.upper())
        out.append({"prompt": f"{mode}: {rng.choice([word, word.upper()])}", "chosen": good, "rejected": bad})
    return out


def config(tmp_path: Path, name: str, data: Path, **kw) -> RMConfig:
    base = dict(model="tiny-random", data=str(data), output_dir=str(tmp_path / name), precision="fp32",
                lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", max_length=64)
    base.update(kw)
    return build_config(RMConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_few_steps_move_head_and_backbone(tmp_path, tiny_path):
    data = write_jsonl(tmp_path / "d.jsonl", case_records(16, random.Random(0)))
    out = reward.train(config(tmp_path, "run", data, max_steps=3, batch_size=4))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss/train", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[0]["perf/pairs_per_s"] > 0
    start, after = load_file(str(tiny_path / "model.safetensors")), weights(out)
    head = RewardModel.from_causal_lm("tiny-random", seed=0).head.weight
    assert not torch.equal(after["score.weight"], head)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])


def test_accumulation_equals_one_big_batch_with_margins(tmp_path):
    # 1 micro-batch of 8 pairs vs 8 micro-batches of 1: each pair's loss is divided by the
    # global pair count (8), so the update is the same to rounding. With eps ≫ |g| Adam's
    # first step is lr·g/eps, so the weights show the gradient itself.
    records = case_records(8, random.Random(1))
    for i, r in enumerate(records):
        r["margin"] = 0.25 * i
    data = write_jsonl(tmp_path / "d.jsonl", records)
    sgd_like = dict(max_steps=1, lr=1.0, adam_eps=1.0, max_grad_norm=0.0, center_coef=0.01)
    big = reward.train(config(tmp_path, "big", data, batch_size=8, grad_accum=1, **sgd_like))
    small = reward.train(config(tmp_path, "small", data, batch_size=1, grad_accum=8, **sgd_like))
    a, b = weights(big), weights(small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)  # padding changes rounding
    assert metrics(big)[0]["loss/train"] == pytest.approx(metrics(small)[0]["loss/train"], abs=1e-6)


# (prompt, chosen, rejected) token ids.
PAIRS = [([5, 9, 14, 3], [7, 22, 8], [11, 4]), ([30, 2], [19, 25, 1, 6, 7], [17]),
         ([3, 4, 5, 6, 7, 8], [9], [10, 11, 12])]


@pytest.mark.parametrize("attention", ["posttrain", "sdpa"])
def test_prefix_shared_rewards_and_gradients_equal_the_plain_layout(tiny_path, attention, monkeypatch):
    # The same 3 pairs (prompts and replies of different lengths) scored one row a pair, the
    # prompt once, and as 6 padded rows: the same rewards and parameter gradients (fp32 sums in
    # another order). "sdpa": a model without posttrain's attention gets the sequences as a mask.
    pairs = [TokenizedPair(*ids, None, i) for i, ids in enumerate(PAIRS)]
    rm = RewardModel.from_causal_lm("tiny-random", seed=0)
    if attention == "sdpa":
        rm.base.set_attn_implementation("sdpa")
    seen = []
    embed = type(rm.backbone.embed_tokens).forward
    monkeypatch.setattr(type(rm.backbone.embed_tokens), "forward",
                        lambda self, ids: seen.append(ids) or embed(self, ids))
    results = {}
    for shared in (True, False):
        rm.zero_grad(set_to_none=True)
        chosen, rejected = reward.pair_rewards(rm, pairs, 0, "cpu", prefix_sharing=shared)
        (chosen * torch.tensor([1.0, -2.0, 0.5]) + rejected * torch.tensor([0.3, 1.0, -1.0])).sum().backward()
        results[shared] = chosen.detach(), rejected.detach(), {n: p.grad.clone() for n, p in rm.named_parameters()}
    for got, want in zip(results[True][:2], results[False][:2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, atol=1e-5 * float(grad.abs().max()), rtol=0,
                                   msg=name)
    if attention == "posttrain":
        # Prompt once, plus p (the copy of its last token) a pair: 4+3+1+2, 2+5+1+1, 6+1+1+3.
        assert tuple(seen[0].shape) == (1, 10 + 9 + 11)


def test_forward_with_sequence_members_needs_positions_and_last_columns(tiny_path):
    rm = RewardModel.from_causal_lm("tiny-random", seed=0)
    with pytest.raises(ValueError, match="need position_ids and last"):
        rm(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 2, 4, dtype=torch.bool))


def test_prefix_sharing_trains_as_the_plain_layout(tmp_path):
    # One SGD-like step (see the accumulation test) with each layout: the same update.
    data = write_jsonl(tmp_path / "d.jsonl", case_records(8, random.Random(2)))
    sgd_like = dict(max_steps=1, batch_size=8, lr=1.0, adam_eps=1.0, max_grad_norm=0.0)
    shared = reward.train(config(tmp_path, "shared", data, **sgd_like))
    plain = reward.train(config(tmp_path, "plain", data, prefix_sharing=False, **sgd_like))
    a, b = weights(shared), weights(plain)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert metrics(shared)[0]["loss/train"] == pytest.approx(metrics(plain)[0]["loss/train"], abs=1e-6)


def test_two_processes_match_one_process(tmp_path):
    # Same global batch (2 processes × 2 pairs vs 1 process × 4 pairs): the per-pair loss is
    # divided by the global pair count / world size and DDP averages, so the weights agree.
    records = case_records(16, random.Random(5))
    for i, r in enumerate(records):
        r["margin"] = 0.1 * i
    data = write_jsonl(tmp_path / "d.jsonl", records)
    one = reward.train(config(tmp_path, "one", data, max_steps=3, batch_size=4, center_coef=0.01))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", "rm", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out),
           "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant",
           "--max-length", "64", "--max-steps", "3", "--batch-size", "2", "--center-coef", "0.01"]
    result = run_group(cmd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = weights(one), weights(out)
    # Each process packs its own pairs' real tokens into one row, so the fp32 gradient sums run in
    # another order; AdamW's g/√v turns that noise on a near-zero gradient entry into a step of up
    # to lr (1e-3). Measured: one entry of the embedding 1.9e-5 apart after 3 steps, all else < 1e-5.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-4)
    assert [r["loss/train"] for r in metrics(out)] == pytest.approx([r["loss/train"] for r in metrics(one)], abs=1e-5)


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", case_records(24, random.Random(2)))
    whole = reward.train(config(tmp_path, "whole", data, max_steps=6, batch_size=2))
    cut = reward.train(config(tmp_path, "cut", data, max_steps=6, batch_size=2, save_steps=3))
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["checkpoint-0000003"]
    # Pretend the run died after step 3: keep its first 3 metric rows and its checkpoint.
    log = cut / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:3]))
    (cut / "model.safetensors").unlink()
    resumed = reward.train(build_config(RMConfig, str(cut / "config.yaml"), {"resume": True}))
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]
    for key, value in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[key], value, atol=1e-6, rtol=1e-5)


def test_lora_trains_adapters_and_head_and_saves_merged_or_separate(tmp_path, tiny_path):
    data = write_jsonl(tmp_path / "d.jsonl", case_records(8, random.Random(3)))
    lora = dict(max_steps=2, batch_size=4, lora_r=4, lr=1e-2)
    merged = reward.train(config(tmp_path, "merged", data, **lora))
    start, after = load_file(str(tiny_path / "model.safetensors")), weights(merged)
    changed = [k for k in start if k in after and not torch.equal(start[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linears move
    assert not torch.equal(after["score.weight"], RewardModel.from_causal_lm("tiny-random").head.weight)
    adapter = reward.train(config(tmp_path, "adapter", data, merge_lora=False, **lora))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    prompts, responses = ["upper: abc", "lower: ABC"], ["ABC", "ABC"]
    torch.testing.assert_close(RewardModel.from_pretrained(adapter).score(prompts, responses),
                               RewardModel.from_pretrained(merged).score(prompts, responses), atol=1e-5, rtol=1e-5)


def test_learning_prefers_the_reply_that_follows_the_instruction(tmp_path):
    # Proof that the loop trains: 100 steps of 16 pairs (≈5 s on one core) take the random
    # tiny model from chance to ≥ 95 % pairwise accuracy on 200 held-out pairs. When this
    # test was written, seeds 0-3 all reached 100 % by step 50; at lr 3e-3 learning stalls at
    # chance for a while before it jumps, hence the larger rate.
    rng = random.Random(0)
    train = write_jsonl(tmp_path / "train.jsonl", case_records(2000, rng))
    held_records = case_records(200, rng)
    held = write_jsonl(tmp_path / "held.jsonl", held_records)
    out = reward.train(config(tmp_path, "run", train, eval_data=str(held), max_steps=100, batch_size=16, lr=5e-3,
                              warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=10, eval_steps=50))
    evals = [r for r in metrics(out) if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [50, 100]
    final = evals[-1]
    assert final["eval/rewards/accuracy"] >= 0.95 and final["eval/rewards/margin"] > 1.0 and final["eval/pairs"] == 200
    assert final["eval/reward_std"] > 0 and "eval/reward_mean" in final

    def accuracy(rm: RewardModel) -> float:
        prompts = [r["prompt"] for r in held_records]
        chosen = rm.score(prompts, [r["chosen"] for r in held_records], batch_size=50)
        rejected = rm.score(prompts, [r["rejected"] for r in held_records], batch_size=50)
        return (chosen > rejected).float().mean().item()

    assert accuracy(RewardModel.from_causal_lm("tiny-random")) < 0.8
    assert accuracy(RewardModel.from_pretrained(out)) == pytest.approx(final["eval/rewards/accuracy"])


def test_bad_record_stops_before_training_or_is_skipped_and_counted(tmp_path, capsys):
    records = case_records(4, random.Random(4)) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=r"bad.jsonl: record 5: field 'rejected'"):
        reward.train(config(tmp_path, "run", data, max_steps=1))
    assert not (tmp_path / "run").exists()
    scored = write_jsonl(tmp_path / "scored.jsonl",
                         [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 1, 2]}])
    out = reward.train(config(tmp_path, "ok", data, eval_data=str(scored), max_steps=1, skip_invalid=True,
                              pairing="best_vs_rest"))
    printed = capsys.readouterr().out
    assert "loaded 4 pairs from" in printed and "skipped 1 invalid (chosen identical to rejected: 1)" in printed
    assert "loaded 2 pairs from" in printed  # best vs rest: (a, b), (a, c)
    assert metrics(out)[-1]["eval/pairs"] == 2
