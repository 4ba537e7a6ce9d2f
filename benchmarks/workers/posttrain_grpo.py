"""posttrain GRPO (β = 0.04: k3 KL in the loss, a frozen reference) through its Python API.

The step clock hooks the module-level `generate` that `posttrain.trainers.grpo.train` calls
first in each iteration (stage 1: K responses to each of the iteration's prompts) and counts
episodes (responses), the prompt tokens of each, and the response tokens actually sampled (up
to and including EOS). μ = 1 and one minibatch: one optimizer step per iteration, over
micro-batches of batch_size responses. Reward: `fn:bench:lowercase_share`. posttrain_rloo.py
runs the same loop with RLOOConfig.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (StepClock, autocast_report, count_parameters, emit, load_spec,  # noqa: E402
                   watch_autocast)


def run(config_class, **algorithm) -> None:
    spec = load_spec()
    clock = StepClock(spec)

    import posttrain.trainers.grpo as grpo

    generate, build_networks = grpo.generate, grpo.build_networks
    seen = {}

    def timed_generate(sampler, prompts, indices, params):
        clock.step_begin()
        with clock.timed("generation"):
            gen = generate(sampler, prompts, indices, params)
        clock.count(episodes=gen.response_ids.shape[0], generated_tokens=gen.response_mask.sum(),
                    prompt_tokens=gen.prompt_mask.sum())
        return gen

    def counted_build_networks(cfg):
        net, reference = build_networks(cfg)
        seen["params"], seen["autocast"] = count_parameters(net.policy), watch_autocast(net.policy)
        return net, reference

    grpo.generate, grpo.build_networks = timed_generate, counted_build_networks
    cfg = config_class(
        model=spec["model_path"], data=spec["data"], output_dir=str(Path(spec["work_dir"]) / "out"),
        judges="fn:bench:lowercase_share", max_length=spec["max_prompt_length"],
        max_new_tokens=spec["response_length"], rollout_batch_size=spec["prompts"],
        num_generations=spec["num_generations"], batch_size=spec["batch_size"], num_minibatches=1,
        num_iterations=1, max_steps=clock.total_steps, lr=1e-6, warmup_ratio=0.0, lr_scheduler="constant",
        weight_decay=0.0, max_grad_norm=1.0, precision=spec["precision"], compile=spec.get("compile", False),
        gradient_checkpointing=spec["gradient_checkpointing"], temperature=1.0, top_p=1.0,
        clip_eps_low=0.2, clip_eps_high=0.2, logging_steps=clock.total_steps, samples_steps=0, seed=spec["seed"],
        **algorithm,
    )
    cfg.validate()
    print(f"advantage={cfg.advantage} loss_type={cfg.loss_type} beta={cfg.beta} kl_in_reward={cfg.kl_in_reward} "
          f"scale_rewards={cfg.scale_rewards}", flush=True)
    grpo.train(cfg)
    emit(clock.result(params=seen["params"], autocast=autocast_report(seen["autocast"]),
                      optimizer="torch.optim.AdamW (posttrain default)"))


if __name__ == "__main__":
    from posttrain.config import GRPOConfig

    run(GRPOConfig, beta=0.04, kl_in_reward=False, loss_type="grpo", scale_rewards=True)
