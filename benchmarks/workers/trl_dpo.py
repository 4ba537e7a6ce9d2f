"""TRL 1.16 DPOTrainer (sigmoid loss, β = 0.1) on the same pairs, token ids and order as posttrain.

Pairs are tokenised by posttrain's loader and given to TRL pre-tokenised (prompt_ids,
chosen_ids, rejected_ids; see the note on _prepare_dataset below), ordered as posttrain's step_items orders them, read with TRL's
sequential sampler. TRL builds its own frozen reference model from the same folder (its
default without PEFT), in fp32 like the policy. Step clock: a TrainerCallback; work counted
from the inputs of each compute_loss call (chosen rows then rejected rows, padded together).
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
from trl import DPOConfig, DPOTrainer  # noqa: E402

from posttrain.data import load_preference_pairs  # noqa: E402
from posttrain.models import load_tokenizer  # noqa: E402
from posttrain.trainers.common import step_items  # noqa: E402

tokenizer = load_tokenizer(spec["model_path"])
pairs, _ = load_preference_pairs(spec["data"], tokenizer, max_length=spec["max_length"])
order = [i for step in range(clock.total_steps) for i in step_items(step, len(pairs), spec["batch_size"], spec["seed"])]
dataset = Dataset.from_list([{"prompt_ids": pairs[i].prompt_ids, "chosen_ids": pairs[i].chosen_ids,
                              "rejected_ids": pairs[i].rejected_ids} for i in order])

model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32,
                                             attn_implementation=spec["trl_attention"])


# TRL 1.16's DPOTrainer always tokenises from text (it has no pre-tokenised path); its
# preparation is replaced by the identity so it reads exactly the ids above. Its collator
# still truncates to max_length and pads as usual.
DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        clock.step_begin()


args = DPOConfig(
    output_dir=str(Path(spec["work_dir"]) / "out"), max_steps=clock.total_steps,
    per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
    learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], dataloader_num_workers=0,
    torch_compile=spec.get("compile", False),
    save_strategy="no", logging_steps=clock.total_steps, max_length=spec["max_length"],
    loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=False,
    gradient_checkpointing=spec["gradient_checkpointing"], train_sampling_strategy="sequential", seed=spec["seed"],
)
trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
autocast = watch_autocast(model)
compute_loss = trainer.compute_loss


def counted_compute_loss(model, inputs, *args, **kwargs):
    mask = inputs["attention_mask"]
    clock.count(tokens=mask.sum(), computed_tokens=mask.sum(), padded_tokens=inputs["input_ids"].numel(),
                loss_tokens=inputs["completion_mask"][:, 1:].sum(), pairs=mask.shape[0] // 2)
    return compute_loss(model, inputs, *args, **kwargs)


trainer.compute_loss = counted_compute_loss
time_batches(trainer, clock)
trainer.train()
emit(clock.result(params=count_parameters(model), autocast=autocast_report(autocast),
                  optimizer=f"AdamW via TRL default optim={args.optim}"))
