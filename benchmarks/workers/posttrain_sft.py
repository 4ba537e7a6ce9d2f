"""posttrain SFT through its Python API, timed from the batches its own loop collates.

posttrain has no callbacks, so the step clock hooks the module-level `collate` that
`posttrain.trainers.sft.train` calls once per micro-batch (grad_accum is 1 here, so once per
optimizer step, before the step's forward): the hook notes the step start and counts the
tokens of the batch the trainer really built. Nothing else in the trainer is changed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)

spec = load_spec()
clock = StepClock(spec)

import posttrain.trainers.sft as sft  # noqa: E402
from posttrain.config import SFTConfig  # noqa: E402

collate = sft.collate
params = {}


def timed_collate(cfg, rows, pad_id):
    clock.step_begin()
    with clock.timed("data"):
        batch = collate(cfg, rows, pad_id)
    clock.count(tokens=batch.attention_mask.sum(), padded_tokens=batch.input_ids.numel(),
                loss_tokens=batch.loss_mask.sum(), rows=batch.input_ids.shape[0])
    return batch


load_causal_lm = sft.load_causal_lm


def counted_load(name):
    model = load_causal_lm(name)
    params["n"] = count_parameters(model)
    params["autocast"] = watch_autocast(model)
    return model


sft.collate = timed_collate
sft.load_causal_lm = counted_load
cfg = SFTConfig(
    model=spec["model_path"], data=spec["data"], output_dir=str(Path(spec["work_dir"]) / "out"),
    max_length=spec["max_length"], batch_size=spec["batch_size"], grad_accum=1,
    max_steps=clock.total_steps, lr=1e-5, warmup_ratio=0.0, lr_scheduler="constant",
    weight_decay=0.0, max_grad_norm=1.0, precision=spec["precision"], compile=spec.get("compile", False),
    gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=clock.total_steps,
    seed=spec["seed"],
)
cfg.validate()
sft.train(cfg)
emit(clock.result(params=params["n"], autocast=autocast_report(params["autocast"]),
                  optimizer="torch.optim.AdamW (posttrain default)"))
