"""posttrain reward model through its Python API, timed from the batches its own loop builds.

The step clock hooks the module-level `pair_rewards` that `posttrain.trainers.reward.train`
calls once per micro-batch (grad_accum is 1: once per optimizer step, before its forward).
Counted per batch, as for DPO: pairs; `tokens` = Σ (2·prompt + chosen + rejected), the two
sequences of every pair as TRL lays them out; `computed_tokens` = the real tokens posttrain's
layout feeds the model (prefix sharing, its default: the prompt once a pair); `padded_tokens` =
the size of the input tensor that `collate_pairs` (or, without prefix sharing, `pad_batch`) built.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)

spec = load_spec()
clock = StepClock(spec)

import posttrain.trainers.reward as reward  # noqa: E402
from posttrain.config import RMConfig  # noqa: E402

pair_rewards, pad_batch, collate_pairs, build_model = (reward.pair_rewards, reward.pad_batch, reward.collate_pairs,
                                                       reward.build_model)
params = {}


def timed_pair_rewards(model, pairs, pad_id, device, **kwargs):
    clock.step_begin()
    prompts = sum(len(p.prompt_ids) for p in pairs)
    replies = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    shared = kwargs.get("prefix_sharing", True)
    clock.count(pairs=len(pairs), tokens=2 * prompts + replies, computed_tokens=(1 if shared else 2) * prompts + replies)
    return pair_rewards(model, pairs, pad_id, device, **kwargs)


def counted_pad_batch(examples, pad_id):
    with clock.timed("data"):
        batch = pad_batch(examples, pad_id)
    clock.count(padded_tokens=batch.input_ids.numel())
    return batch


def counted_collate_pairs(pairs, pad_id, **kwargs):
    with clock.timed("data"):
        batch = collate_pairs(pairs, pad_id, **kwargs)
    clock.count(padded_tokens=batch.input_ids.numel())
    return batch


def counted_build_model(cfg):
    model = build_model(cfg)
    params["n"] = count_parameters(model)
    params["autocast"] = watch_autocast(model)
    return model


reward.pair_rewards, reward.pad_batch, reward.collate_pairs, reward.build_model = (
    timed_pair_rewards, counted_pad_batch, counted_collate_pairs, counted_build_model)
cfg = RMConfig(
    model=spec["model_path"], data=spec["data"], output_dir=str(Path(spec["work_dir"]) / "out"),
    max_length=spec["max_length"], batch_size=spec["batch_size"], grad_accum=1,
    max_steps=clock.total_steps, lr=1e-5, warmup_ratio=0.0, lr_scheduler="constant",
    weight_decay=0.0, max_grad_norm=1.0, precision=spec["precision"], compile=spec.get("compile", False),
    gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=clock.total_steps,
    seed=spec["seed"],
)
cfg.validate()
print(f"prefix_sharing={cfg.prefix_sharing}", flush=True)
reward.train(cfg)
emit(clock.result(params=params["n"], autocast=autocast_report(params["autocast"]),
                  optimizer="torch.optim.AdamW (posttrain default)"))
