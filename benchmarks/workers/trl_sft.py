"""TRL 1.16 SFTTrainer on the same token ids, in the same order, as posttrain's run.

The records are tokenised by posttrain's own loader (chat template, completion-only loss
mask, truncation to max_length) and handed to TRL pre-tokenised as input_ids + labels (-100
off the loss mask), ordered as posttrain's step_items orders them and read with TRL's
sequential sampler; so both tools train on identical batches. The step clock is a
TrainerCallback (on_step_begin); tokens are counted from the inputs of each compute_loss call.
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
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from posttrain.data import load_sft_examples  # noqa: E402
from posttrain.models import load_tokenizer  # noqa: E402
from posttrain.trainers.common import step_items  # noqa: E402

tokenizer = load_tokenizer(spec["model_path"])
examples, _ = load_sft_examples(spec["data"], tokenizer, max_length=spec["max_length"])
order = [i for step in range(clock.total_steps)
         for i in step_items(step, len(examples), spec["batch_size"], spec["seed"])]
dataset = Dataset.from_list([
    {"input_ids": examples[i].input_ids,
     "labels": [t if keep else -100 for t, keep in zip(examples[i].input_ids, examples[i].loss_mask)]}
    for i in order])

model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32,
                                             attn_implementation=spec["trl_attention"])


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        clock.step_begin()


args = SFTConfig(
    output_dir=str(Path(spec["work_dir"]) / "out"), max_steps=clock.total_steps,
    per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], dataloader_num_workers=0,
    torch_compile=spec.get("compile", False),
    save_strategy="no", logging_steps=clock.total_steps, disable_tqdm=False,
    max_length=spec["max_length"], packing=False, gradient_checkpointing=spec["gradient_checkpointing"],
    train_sampling_strategy="sequential", seed=spec["seed"],
)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                     callbacks=[Clock()])
autocast = watch_autocast(model)
compute_loss = trainer.compute_loss


def counted_compute_loss(model, inputs, *args, **kwargs):
    # Counted where the loss is computed: accelerate's loader fetches one batch ahead, so a
    # count in the collator would land on the previous step.
    clock.count(tokens=inputs["attention_mask"].sum(), padded_tokens=inputs["input_ids"].numel(),
                loss_tokens=(inputs["labels"][:, 1:] != -100).sum(), rows=inputs["input_ids"].shape[0])
    return compute_loss(model, inputs, *args, **kwargs)


trainer.compute_loss = counted_compute_loss
time_batches(trainer, clock)
trainer.train()
emit(clock.result(params=count_parameters(model), autocast=autocast_report(autocast),
                  optimizer=f"AdamW via TRL default optim={args.optim}"))
