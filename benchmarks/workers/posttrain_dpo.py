"""posttrain DPO (sigmoid loss, β = 0.1, its defaults otherwise) through its Python API.

The step clock hooks `PairSet.batch`, which `posttrain.trainers.dpo.train` calls once per
micro-batch at the start of a step (grad_accum is 1: once per optimizer step). Counted per
batch: pairs; reply (loss) tokens; `tokens` = Σ (2·prompt + chosen + rejected), the tokens
of the two sequences of every pair as TRL lays them out; `computed_tokens` = the real tokens
posttrain's layout feeds the model (with prefix sharing, its default, the prompt once per
pair: Σ (prompt + chosen + rejected)); `padded_tokens` = the size of the input tensor.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)

spec = load_spec()
clock = StepClock(spec)

import posttrain.trainers.dpo as dpo  # noqa: E402
from posttrain.config import DPOConfig  # noqa: E402

batch, load_causal_lm = dpo.PairSet.batch, dpo.load_causal_lm
params = {}


def timed_batch(self, indices, pad_id, prefix_sharing):
    clock.step_begin()
    with clock.timed("data"):
        out = batch(self, indices, pad_id, prefix_sharing)
    pairs = [self.pairs[i] for i in indices]
    prompts = sum(len(p.prompt_ids) for p in pairs)
    replies = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    clock.count(pairs=len(pairs), loss_tokens=replies, tokens=2 * prompts + replies,
                computed_tokens=(1 if prefix_sharing else 2) * prompts + replies, padded_tokens=out.input_ids.numel())
    return out


def counted_load(name):
    model = load_causal_lm(name)
    params["n"] = count_parameters(model)
    params["autocast"] = watch_autocast(model)
    return model


dpo.PairSet.batch, dpo.load_causal_lm = timed_batch, counted_load
cfg = DPOConfig(
    model=spec["model_path"], data=spec["data"], output_dir=str(Path(spec["work_dir"]) / "out"),
    max_length=spec["max_length"], batch_size=spec["batch_size"], grad_accum=1,
    max_steps=clock.total_steps, lr=1e-6, warmup_ratio=0.0, lr_scheduler="constant",
    weight_decay=0.0, max_grad_norm=1.0, precision=spec["precision"], loss="sigmoid", beta=0.1,
    compile=spec.get("compile", False),
    precompute_ref=False, gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=clock.total_steps,
    seed=spec["seed"],
)
cfg.validate()
print(f"prefix_sharing={cfg.prefix_sharing}", flush=True)
dpo.train(cfg)
emit(clock.result(params=params["n"], autocast=autocast_report(params["autocast"]),
                  optimizer="torch.optim.AdamW (posttrain default)",
                  prefix_sharing=cfg.prefix_sharing))
