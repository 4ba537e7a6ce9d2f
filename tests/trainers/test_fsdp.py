"""Sharded training (FSDP2) on 2 CPU processes (torchrun, gloo) against 1 process, on the tiny model.

Tolerances, fp32: losses within 1e-5 absolute and final weights within atol 1e-5 / rtol 1e-4 of one
process (measured when written: weights 5e-7 apart for SFT, fp32 rounding of the same sums reduced in
another order). PPO with LoRA in bf16: FSDP against DDP (its processes shuffle their own minibatches,
so 2 processes cannot match 1), losses and KL within 2e-4 absolute, weights within atol 1e-4. Measured:
identical until FSDP gathered the Linear weights already in bf16 (MixedPrecisionPolicy) instead of
autocast casting them; since, step 1 identical, step 2's policy loss 4.6e-5 apart (of 0.024), the
held-out KL 1.9e-4 (of 0.0044), weights 2.2e-5. The same SFT runs (LoRA, accumulation) stay identical.
Each launch runs under run_group: a timeout, a free port (--standalone), every rank killed when the
test ends, passed or failed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from process_groups import run_group
from posttrain.config import DPOConfig, SFTConfig, build_config
from posttrain.trainers import dpo, sft, sharding
from posttrain.trainers.common import make_accelerator
from posttrain.trainers.run_folder import check_output_dir

HERE = Path(__file__).resolve().parent
BASE = dict(model="tiny-random", precision="fp32", lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", max_length=64)
LOSS = dict(abs=1e-5)
WEIGHTS = dict(atol=1e-5, rtol=1e-4)
LOSS_BF16 = dict(abs=2e-4)
WEIGHTS_BF16 = dict(atol=1e-4, rtol=1e-4)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(n)]


def sft_config(out: Path, **kw) -> SFTConfig:
    return build_config(SFTConfig, None, {**BASE, "output_dir": str(out), **kw})


def flags(config: dict) -> list[str]:
    """CLI flags for a config mapping ({"max_steps": 4} -> ["--max-steps", "4"]; True -> "--flag")."""
    out = []
    for key, value in config.items():
        out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def two_processes(command: str, config: dict, tmp_path: Path, *, sharded: bool = True, units: int = 2,
                  bf16: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posttrain.cli", command, *flags({**BASE, **config})]
    # This folder on the ranks' path: PPO's reward function is this module's lowercase_fraction.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"}
    result = run_group(cmd, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    said = (f"sharding: FSDP2 by torch, {units} layer units + root over 2 processes"
            f"{', Linear weights gathered in bf16' if bf16 else ''}\n") in result.stdout + result.stderr
    assert said == sharded


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss/train"]) for row in map(json.loads, (folder / "metrics.jsonl").open())]


def assert_same_run(a: Path, b: Path, loss=LOSS, weights=WEIGHTS) -> None:
    (steps_a, loss_a), (steps_b, loss_b) = zip(*losses(a)), zip(*losses(b))
    assert steps_a == steps_b
    assert loss_b == pytest.approx(loss_a, **loss)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], **weights, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """SFT, 4 steps with a checkpoint at step 2, global batch 4: on 1 process (batch 4) and on 2
    sharded processes (batch 2 each)."""
    root = tmp_path_factory.mktemp("fsdp_sft")
    data = write_jsonl(root / "d.jsonl", [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in words(16)])
    run = dict(data=str(data), max_steps=4, save_steps=2, sharding="fsdp")
    one = sft.train(sft_config(root / "one", **run, batch_size=4))
    two_processes("sft", {**run, "output_dir": str(root / "two"), "batch_size": 2}, root)
    return types.SimpleNamespace(root=root, data=data, one=one, two=root / "two", run=run)


def test_fsdp_sft_on_two_processes_matches_one_process(sft_runs):
    assert_same_run(sft_runs.one, sft_runs.two)
    checkpoint = sft_runs.two / "checkpoints" / "checkpoint-0000002"
    # Each process wrote its own shards of the model and optimizer (DCP), and its RNG streams.
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in (checkpoint / "sharded_state").iterdir()}
    assert {"rng-0.pt", "rng-1.pt", "scheduler.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_batch"] == 4


def test_fsdp_saved_model_loads_with_from_pretrained_and_matches(sft_runs):
    one = AutoModelForCausalLM.from_pretrained(sft_runs.one).eval()
    two = AutoModelForCausalLM.from_pretrained(sft_runs.two).eval()
    assert two.lm_head.weight is two.model.embed_tokens.weight  # saved tied, as the starting model
    ids = torch.tensor([[5, 17, 33, 60, 71, 2]])
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, atol=1e-4, rtol=1e-4)


def test_fsdp_checkpoint_of_two_processes_resumes_on_one(sft_runs):
    out = sft_runs.root / "two_to_one"
    shutil.copytree(sft_runs.two, out)
    resumed = sft.train(sft_config(out, **sft_runs.run, batch_size=4, resume=True))
    assert_same_run(sft_runs.one, resumed)


def test_fsdp_checkpoint_of_one_process_resumes_on_two(sft_runs):
    out = sft_runs.root / "one_to_two"
    shutil.copytree(sft_runs.one, out)
    two_processes("sft", {**sft_runs.run, "output_dir": str(out), "batch_size": 2, "resume": True}, sft_runs.root)
    assert_same_run(sft_runs.one, out)


def test_fsdp_resume_refuses_another_batch_split_config_or_sharding(sft_runs):
    out = sft_runs.root / "refused"
    shutil.copytree(sft_runs.two, out)
    resume = dict(sft_runs.run, resume=True)
    with pytest.raises(ValueError, match=r"global batches of 4 records \(2 process\(es\)\); this run's would be 3 .*"
                                         r"give batch_size × grad_accum = 4 on 1 process\(es\)"):
        sft.train(sft_config(out, **resume, batch_size=3))
    with pytest.raises(ValueError, match="4 does not divide over 3 processes"):
        check_output_dir(sft_config(out, **resume, batch_size=1), world_size=3)
    with pytest.raises(ValueError, match=r"differs in .*sharding \('fsdp' → 'none'\)"):
        sft.train(sft_config(out, **{**resume, "sharding": "none"}, batch_size=4))
    with pytest.raises(ValueError, match=r"differs in lora_r \(0 → 4\)"):
        sft.train(sft_config(out, **resume, batch_size=4, lora_r=4))


def test_fsdp_dpo_on_two_processes_matches_one_process(tmp_path):
    # The frozen reference copy is sharded too (sharding.prepare_frozen); the baseline is plain DPO.
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w + w}
                                              for w in words(16, seed=1)])
    run = dict(data=str(data), max_steps=3)
    one = dpo.train(build_config(DPOConfig, None, {**BASE, **run, "output_dir": str(tmp_path / "one"),
                                                   "batch_size": 4}))
    two_processes("dpo", {**run, "output_dir": str(tmp_path / "two"), "batch_size": 2, "sharding": "fsdp"}, tmp_path)
    assert_same_run(one, tmp_path / "two")


def lowercase_fraction(prompts, responses):
    """PPO's toy reward: share of response characters that are lowercase letters."""
    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]


@pytest.mark.needs_bf16
def test_bf16_sft_under_fsdp_gathers_bf16_weights_and_computes_what_autocast_does(tmp_path):
    # Under bf16 FSDP gathers each layer's Linear weights already cast (MixedPrecisionPolicy) and
    # keeps its RMSNorm weights fp32; DDP runs autocast over whole fp32 weights. Autocast casts the
    # same Linear weights with the same rounding, so the two compute the same thing, with gradient
    # accumulation and checkpointing too: the first step's loss (2 micro-batches, before any update)
    # is the same number. Later steps start from fp32 master weights that FSDP's sharded gradient
    # reduction and norm leave ~1e-7 apart from DDP's (measured in fp32 runs, before and after
    # padding-free passes), and now and then such a difference moves a weight across a bf16
    # rounding boundary: measured losses 2e-6 and weights 1.9e-5 apart after 4 steps.
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in words(32)])
    run = dict(data=str(data), precision="bf16", max_steps=4, batch_size=2, grad_accum=2, gradient_checkpointing=True)
    two_processes("sft", {**run, "output_dir": str(tmp_path / "fsdp"), "sharding": "fsdp"}, tmp_path, bf16=True)
    two_processes("sft", {**run, "output_dir": str(tmp_path / "ddp")}, tmp_path, sharded=False)
    assert losses(tmp_path / "fsdp")[0][1] == pytest.approx(losses(tmp_path / "ddp")[0][1], abs=1e-9)
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp", loss=dict(abs=1e-5), weights=dict(atol=5e-5, rtol=0))


@pytest.mark.needs_bf16
def test_ppo_with_lora_in_bf16_under_fsdp_trains_as_ddp_does(tmp_path, tiny_path):
    # PPO's processes shuffle their own minibatches, so 2 processes are compared with 2 (DDP), not
    # with 1. LoRA on policy and critic: adapters (trainable) and frozen base weights share FSDP
    # units, the reference is the policy with adapters off (a pass through the sharded root), the
    # sampler reads a per-process copy gathered after each update; bf16 compute over fp32 master
    # weights, as on one process. 5 held-out prompts do not split evenly over 2 processes.
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": w} for w in words(16, seed=2)])
    write_jsonl(tmp_path / "held.jsonl", [{"prompt": w} for w in words(5, seed=3)])
    run = dict(data=str(tmp_path / "prompts.jsonl"), eval_data=str(tmp_path / "held.jsonl"),
               reward_fn=f"{__name__}:lowercase_fraction", precision="bf16", lr=3e-3, max_new_tokens=8,
               rollout_batch_size=8, num_minibatches=2, batch_size=2, ppo_epochs=2, max_steps=2, lora_r=4,
               critic_lora_r=4)
    two_processes("ppo", {**run, "output_dir": str(tmp_path / "fsdp"), "sharding": "fsdp"}, tmp_path, units=4,
                  bf16=True)
    two_processes("ppo", {**run, "output_dir": str(tmp_path / "ddp")}, tmp_path, sharded=False)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()] for name in ("fsdp", "ddp")}
    assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["ddp"]] == [0, 1, 2, 2]
    for a, b in zip(rows["ddp"], rows["fsdp"]):
        for key in ("loss/policy", "loss/value", "objective/scores", "eval/scores", "eval/kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], **LOSS_BF16), (a["step"], key)
    wa, wb = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], **WEIGHTS_BF16)
    start = load_file(str(tiny_path / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wb[q], start[q])  # merged adapters: LoRA trained under FSDP


def test_a_model_without_layers_to_shard_is_refused(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", [])
    with pytest.raises(ValueError, match=r"sharding=fsdp: TokenLogprobs has no decoder layers"):
        sft.train(sft_config(tmp_path / "run", data=str(data), max_steps=1, sharding="fsdp"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_launches_that_would_not_shard_as_asked_are_refused(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="launched with an accelerate FSDP config but sharding='none'"):
        make_accelerator(sft_config(tmp_path / "run", data=str(data)))
    # With deepspeed installed, accelerate on CPUs (cpu=True) ignores a DeepSpeed config and groups
    # the processes for DDP; posttrain refuses rather than train unsharded.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    grouped = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=1)
    with pytest.raises(ValueError, match="launched with an accelerate DeepSpeed config: posttrain does not train"):
        sharding.engine(sft_config(tmp_path / "run", data=str(data)), grouped)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    # What accelerate 1.15 gives each process of an FSDP launch on CPUs when no group forms.
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = types.SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but accelerate joined 1 process"):
        sharding.engine(sft_config(tmp_path / "run", data=str(data), sharding="fsdp"), alone)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    gpus = types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=1)
    with pytest.raises(ValueError, match="on GPUs launch with accelerate launch --config_file "
                                         "configs/accelerate/fsdp.yaml"):
        sharding.engine(sft_config(tmp_path / "run", data=str(data), sharding="fsdp"), gpus)


def test_eval_batches_are_as_many_on_every_process():
    # 5 items over 2 processes in batches of 2: process 0 has [0, 2] [4], process 1 [1, 3] and a
    # repeat of item 0 that does not count; under FSDP both must run two forwards.
    ranks = [types.SimpleNamespace(process_index=r, num_processes=2) for r in (0, 1)]
    assert sharding.eval_batches(list(range(5)), 2, ranks[0]) == [([0, 2], True), ([4], True)]
    assert sharding.eval_batches(list(range(5)), 2, ranks[1]) == [([1, 3], True), ([0], False)]
