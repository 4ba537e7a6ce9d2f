"""posttrain: post-training for language models — instruction data and SFT, sampled and judged
preferences, reward models, DPO and KTO, PPO, GRPO and RLOO, evaluation and recipes.

The public API, importable from `posttrain` directly:

    import posttrain
    cfg = posttrain.SFTConfig(model="smollm2-135m-instruct", data="examples/data/instructions.jsonl",
                              max_steps=20, output_dir="outputs/sft")
    folder = posttrain.train_sft(cfg)                      # → the saved model folder
    replies = posttrain.chat_replies(posttrain.load_causal_lm(folder), posttrain.load_tokenizer(folder),
                                     ["Why is the sky blue?"], posttrain.SamplingParams(max_new_tokens=64))

Names are resolved on first use (PEP 562), so `import posttrain` and `posttrain --help` stay
instant: torch and transformers load only when a model-facing name is touched.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

PUBLIC = {
    # configs: one flat dataclass per trainer
    "SFTConfig": "posttrain.config", "RMConfig": "posttrain.config", "DPOConfig": "posttrain.config",
    "KTOConfig": "posttrain.config", "PPOConfig": "posttrain.config", "GRPOConfig": "posttrain.config",
    "RLOOConfig": "posttrain.config", "build_config": "posttrain.config",
    # trainers: train(cfg) -> the folder of the saved model
    "train_sft": "posttrain.trainers.sft:train", "train_reward_model": "posttrain.trainers.reward:train",
    "train_dpo": "posttrain.trainers.dpo:train", "train_kto": "posttrain.trainers.kto:train",
    "train_ppo": "posttrain.trainers.ppo:train", "train_grpo": "posttrain.trainers.grpo:train",
    "train_rloo": "posttrain.trainers.grpo:train",
    # models
    "load_causal_lm": "posttrain.models", "load_tokenizer": "posttrain.models",
    "RewardModel": "posttrain.models.reward",
    # sampling and scoring
    "Sampler": "posttrain.sampling", "SamplingParams": "posttrain.sampling", "Generation": "posttrain.sampling",
    "chat_generation": "posttrain.sampling", "chat_replies": "posttrain.sampling",
    "load_scorer": "posttrain.scoring", "load_judge": "posttrain.scoring",
    # evaluation and recipes
    "evaluate": "posttrain.eval.run", "evaluate_many": "posttrain.eval.run", "run_recipe": "posttrain.recipes",
}
"""Public name → "module" (same name there) or "module:name"."""

__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    module, _, attribute = PUBLIC[name].partition(":")
    value = getattr(import_module(module), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])
