"""TRL 1.16 RewardTrainer on the same pairs, token ids and order as posttrain's run.

Pairs are tokenised by posttrain's loader (chat template, truncation to max_length) and
given to TRL pre-tokenised (chosen_ids / rejected_ids = prompt + reply), ordered as
posttrain's step_items orders them, read with TRL's sequential sampler. The model is the
same AutoModelForSequenceClassification (num_labels=1, fresh head) posttrain builds. Step
clock: a TrainerCallback; work counted from the inputs of each compute_loss call.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast, time_batches)

spec = load_spec()
clock = StepClock(spec)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, TrainerCallback  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from posttrain.data import load_preference_pairs  # noqa: E402
from posttrain.models import load_tokenizer  # noqa: E402
from posttrain.trainers.common import step_items  # noqa: E402

tokenizer = load_tokenizer(spec["model_path"])
pairs, _ = load_preference_pairs(spec["data"], tokenizer, max_length=spec["max_length"])
order = [i for step in range(clock.total_steps) for i in step_items(step, len(pairs), spec["batch_size"], spec["seed"])]
dataset = Dataset.from_list([{"chosen_ids": pairs[i].prompt_ids + pairs[i].chosen_ids,
                              "rejected_ids": pairs[i].prompt_ids + pairs[i].rejected_ids} for i in order])

torch.manual_seed(spec["seed"])
model = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=1, dtype=torch.float32,
                                                           attn_implementation=spec["trl_attention"])
model.config.pad_token_id = tokenizer.pad_token_id


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        clock.step_begin()


args = RewardConfig(
    output_dir=str(Path(spec["work_dir"]) / "out"), max_steps=clock.total_steps,
    per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], dataloader_num_workers=0,
    torch_compile=spec.get("compile", False),
    save_strategy="no", logging_steps=clock.total_steps, max_length=spec["max_length"],
    gradient_checkpointing=spec["gradient_checkpointing"], train_sampling_strategy="sequential", seed=spec["seed"],
)
trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[Clock()])
autocast = watch_autocast(model)
compute_loss = trainer.compute_loss


def counted_compute_loss(model, inputs, *args, **kwargs):
    # Chosen rows then rejected rows, padded together (as posttrain does with prefix_sharing=False).
    clock.count(tokens=inputs["attention_mask"].sum(), computed_tokens=inputs["attention_mask"].sum(),
                padded_tokens=inputs["input_ids"].numel(),
                pairs=inputs["input_ids"].shape[0] // 2)
    return compute_loss(model, inputs, *args, **kwargs)


trainer.compute_loss = counted_compute_loss
time_batches(trainer, clock)
trainer.train()
emit(clock.result(params=count_parameters(model), autocast=autocast_report(autocast),
                  optimizer=f"AdamW via TRL default optim={args.optim}"))
