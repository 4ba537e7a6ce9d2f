"""TRL 1.16 GRPOTrainer (β = 0.04, loss_type grpo) on the same prompts, K, lengths and reward as
posttrain_grpo.py.

TRL reads the prompt conversations of posttrain's loader, in posttrain's order (step_items,
shuffle_dataset=False), and renders them with the same tokenizer's chat template; the worker
checks that the ids it generates from are posttrain's, step by step. Its reference is built
from the same folder in fp32 like the policy (its default without PEFT). per_device_train_batch_size
responses a micro-batch, accumulated over one generation batch: one optimizer step per
generation (μ = 1). Step clock: a TrainerCallback's on_step_begin; work counted in a wrapper
around the trainer's `_generate_single_turn` (its transformers `generate` call): episodes,
prompt tokens, completion tokens up to and including EOS. trl_rloo.py runs `run` with RLOO.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, lowercase_share,  # noqa: E402
                   load_spec, watch_autocast, time_batches)


def run(trainer_class, config_class, completion_ids_of, **algorithm) -> None:
    """completion_ids_of: the completion ids (a list of B id lists) in what the trainer's
    `_generate_single_turn` returns."""
    spec = load_spec()
    clock = StepClock(spec)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain.data import load_prompts
    from posttrain.models import load_tokenizer
    from posttrain.trainers.common import step_items

    k = spec["num_generations"]
    tokenizer = load_tokenizer(spec["model_path"])
    prompts, _ = load_prompts(spec["data"], tokenizer, max_prompt_length=spec["max_prompt_length"])
    steps = [step_items(step, len(prompts), spec["prompts"], spec["seed"]) for step in range(clock.total_steps)]
    dataset = Dataset.from_list([{"prompt": prompts[i].messages} for step in steps for i in step])
    expected = iter([[prompts[i].input_ids for i in step for _ in range(k)] for step in steps])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32,
                                             attn_implementation=spec["trl_attention"])

    def lowercase_reward(prompts, completions, **kwargs):
        return lowercase_share(prompts, [c[0]["content"] for c in completions])

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begin()

    args = config_class(
        output_dir=str(Path(spec["work_dir"]) / "out"), max_steps=clock.total_steps,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["prompts"] * k // spec["batch_size"], num_generations=k,
        max_completion_length=spec["response_length"], temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
        epsilon=0.2, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], save_strategy="no",
        torch_compile=spec.get("compile", False),
        logging_steps=clock.total_steps, gradient_checkpointing=spec["gradient_checkpointing"], seed=spec["seed"],
        dataloader_num_workers=0, shuffle_dataset=False, disable_dropout=True, use_vllm=False, **algorithm,
    )
    trainer = trainer_class(model=model, reward_funcs=lowercase_reward, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[Clock()])
    autocast = watch_autocast(model)
    generate = trainer._generate_single_turn

    def counted_generate(prompt_ids, *args, **kwargs):
        if [list(ids) for ids in prompt_ids] != next(expected):
            raise RuntimeError("TRL generates from other prompt ids than posttrain's (chat template or order)")
        with clock.timed("generation"):
            out = generate(prompt_ids, *args, **kwargs)
        completions = completion_ids_of(out)
        clock.count(episodes=len(completions), generated_tokens=sum(len(c) for c in completions),
                    prompt_tokens=sum(len(ids) for ids in prompt_ids))
        return out

    trainer._generate_single_turn = counted_generate
    time_batches(trainer, clock)
    trainer.train()
    emit(clock.result(params=count_parameters(model), autocast=autocast_report(autocast),
                      optimizer=f"AdamW via TRL default optim={args.optim}"))


if __name__ == "__main__":
    from trl import GRPOConfig, GRPOTrainer

    # use_bias_correction_kl=False: plain k3 per token (DeepSeekMath Eq. 4), as posttrain computes it.
    run(GRPOTrainer, GRPOConfig, lambda out: out[0], beta=0.04, loss_type="grpo", scale_rewards="group",
        use_bias_correction_kl=False)
