"""posttrain PPO through its Python API, timed from the rollouts its own loop generates.

The step clock hooks the module-level `generate` that `posttrain.trainers.ppo.train` calls
once per iteration (stage 1, first thing of an iteration) and counts the episodes and the
response tokens actually sampled (up to and including each response's stop); a hook on
`ppo_epochs` (stage 6) closes the last iteration before the final save.
The reward model and the critic's start are the benchmark's reward-model folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)

spec = load_spec()
clock = StepClock(spec)

import posttrain.trainers.ppo as ppo  # noqa: E402
from posttrain.config import PPOConfig  # noqa: E402

generate, build_networks, ppo_epochs = ppo.generate, ppo.build_networks, ppo.ppo_epochs
params = {}


def timed_generate(sampler, prompts, indices, params):
    clock.step_begin()
    with clock.timed("generation"):
        gen = generate(sampler, prompts, indices, params)
    clock.count(episodes=gen.response_ids.shape[0], generated_tokens=gen.response_mask.sum(),
                prompt_tokens=gen.prompt_mask.sum())
    return gen


def counted_build_networks(cfg):
    net, reference = build_networks(cfg)
    params["policy"] = count_parameters(net.policy)
    params["autocast"] = watch_autocast(net.policy)
    return net, reference


def timed_ppo_epochs(*args, **kwargs):
    stats = ppo_epochs(*args, **kwargs)
    if len(clock.starts) == clock.total_steps - 1:
        # The last iteration's end (after its PPO epochs), before the final save.
        clock.step_begin()
    return stats


ppo.generate, ppo.build_networks, ppo.ppo_epochs = timed_generate, counted_build_networks, timed_ppo_epochs
cfg = PPOConfig(
    model=spec["model_path"], data=spec["data"], output_dir=str(Path(spec["work_dir"]) / "out"),
    reward_model=spec["reward_model"], max_length=spec["max_prompt_length"], max_new_tokens=spec["response_length"],
    rollout_batch_size=spec["batch_size"], batch_size=spec["batch_size"], num_minibatches=1, ppo_epochs=4,
    max_steps=clock.total_steps - 1, lr=3e-6, warmup_ratio=0.0, lr_scheduler="constant", weight_decay=0.0,
    max_grad_norm=1.0, precision=spec["precision"], gradient_checkpointing=spec["gradient_checkpointing"],
    temperature=1.0, kl_coef=0.05, vf_coef=0.1, clip_eps=0.2, value_clip_eps=0.2, gamma=1.0, lam=0.95,
    logging_steps=clock.total_steps, samples_steps=0, seed=spec["seed"],
)
cfg.validate()
ppo.train(cfg)
emit(clock.result(params=params["policy"], autocast=autocast_report(params["autocast"]),
                  optimizer="torch.optim.AdamW (posttrain default)"))
