"""TRL 1.12.0 PPOTrainer (trl.experimental.ppo, the last release with PPO) on the same prompts.

Prompts are tokenised by posttrain's loader (chat template with generation prompt) and
given to TRL as input_ids, in posttrain's order (TRL's shuffling loader is replaced by a
sequential one after construction). Policy and reference: the LM; reward model and critic start: the
benchmark's reward-model folder (the same one posttrain reads). Responses stop at EOS
(stop_token="eos") or response_length. TRL's PPO builds its own Accelerator, which under
transformers 5 ignores bf16=True, so run.py sets ACCELERATE_MIXED_PRECISION=bf16 for it.
TRL's PPO loop has on_step_end but no on_step_begin: the clock marks train begin and every
step end. Work is counted in a wrapper around the module's batch_generation.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)

spec = load_spec()
clock = StepClock(spec)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback  # noqa: E402

import trl.experimental.ppo.ppo_trainer as ppo_module  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from posttrain.data import load_prompts  # noqa: E402
from posttrain.models import load_tokenizer  # noqa: E402
from posttrain.trainers.common import step_items  # noqa: E402

updates = clock.total_steps - 1
tokenizer = load_tokenizer(spec["model_path"])
tokenizer.padding_side = "left"
prompts, _ = load_prompts(spec["data"], tokenizer, max_prompt_length=spec["max_prompt_length"])
order = [i for step in range(updates) for i in step_items(step, len(prompts), spec["batch_size"], spec["seed"])]
dataset = Dataset.from_list([{"input_ids": prompts[i].input_ids} for i in order])

load = dict(dtype=torch.float32, attn_implementation=spec["trl_attention"])
policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], **load)
ref_policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], **load)
reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **load)
value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **load)

batch_generation = ppo_module.batch_generation


def counted_batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config,
                             *args, **kwargs):
    with clock.timed("generation"):
        query_responses, logits = batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id,
                                                   generation_config, *args, **kwargs)
    responses = query_responses[:, queries.shape[1]:]
    # Tokens sampled per row: up to and including the first EOS, else all of them.
    is_eos = responses == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], responses.shape[1],
                                                                                     dtype=torch.long))
    # Queries are left-padded: a row's prompt starts at its first non-pad token (the pad id may
    # also occur inside a ChatML prompt, so pad tokens are not simply counted).
    real = queries != pad_token_id
    prompt_tokens = (queries.shape[1] - real.float().argmax(1)).sum()
    clock.count(episodes=queries.shape[0], generated_tokens=first.sum(), prompt_tokens=prompt_tokens)
    return query_responses, logits


ppo_module.batch_generation = counted_batch_generation


class Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        clock.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        clock.step_begin()


args = PPOConfig(
    output_dir=str(Path(spec["work_dir"]) / "out"), per_device_train_batch_size=spec["batch_size"],
    gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=4, total_episodes=updates * spec["batch_size"],
    local_rollout_forward_batch_size=spec["batch_size"], response_length=spec["response_length"],
    stop_token="eos", temperature=1.0, missing_eos_penalty=None, num_sample_generations=0,
    kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
    whiten_rewards=False, learning_rate=3e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    max_grad_norm=1.0, bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], save_strategy="no",
    logging_steps=clock.total_steps, gradient_checkpointing=spec["gradient_checkpointing"], seed=spec["seed"],
    dataloader_num_workers=0,
)
trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                     reward_model=reward_model, train_dataset=dataset, value_model=value_model, callbacks=[Clock()])
autocast = watch_autocast(policy)
# TRL's PPO loader shuffles; replaced by one in posttrain's order (same prompts each step).
trainer.dataloader = trainer.accelerator.prepare(DataLoader(
    dataset, batch_size=trainer.local_dataloader_batch_size, shuffle=False, collate_fn=trainer.data_collator,
    drop_last=True))
trainer.train()
emit(clock.result(params=count_parameters(policy), autocast=autocast_report(autocast),
                  optimizer=f"AdamW via TRL default optim={args.optim}"))
