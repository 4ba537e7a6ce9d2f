"""One flat config dataclass per trainer; YAML files and CLI flags fill them.

Precedence is defaults → YAML → flags. Every field carries a one-line docstring under it; the
CLI reads those docstrings for its --help, so the dataclass is the single place an option is
described. Validation runs before any model or data is loaded and raises one-line errors that
name the key and the offending value.
"""

from __future__ import annotations

import ast
import math
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

SCHEDULERS = ("linear", "cosine", "constant")
PATH_FIELDS = ("model", "data", "eval_data", "output_dir", "chat_template", "reward_model", "value_model",
               "reward_fn", "judges")
"""Fields that name a file, folder, model or function (where a config has them): none may hold an
invisible or control character."""


class ConfigError(ValueError):
    """A bad configuration value: the message names the key and the value."""


@dataclass
class TrainConfig:
    """Fields every trainer shares. Each trainer's config repeats none of these."""

    model: str = "smollm2-135m-instruct"
    """Causal LM to start from: a built-in name (smollm2-135m-instruct, tiny-random), an HF id or a local folder."""
    data: str = ""
    """Training data: a JSONL/JSON/CSV/Parquet file, a `datasets` folder or a hub id."""
    eval_data: str = ""
    """Held-out data in the same format, evaluated every eval_steps and at the end (empty: none)."""
    output_dir: str = "outputs/run"
    """Folder for checkpoints, metrics.jsonl, the resolved config and the final model."""
    seed: int = 0
    """Seed for data order, initialisation of new heads and sampling."""
    max_length: int = 512
    """Longest tokenised record; longer ones are truncated or dropped (see overlong)."""
    overlong: str = "truncate"
    """What to do with records longer than max_length: truncate or drop."""
    skip_invalid: bool = False
    """Drop invalid records (and report how many and why) instead of stopping at the first."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from epochs."""
    batch_size: int = 4
    """Micro-batch size per process: records (SFT with --packing: packed rows)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon (added to the root of the second moment)."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming the learning rate up linearly from 0."""
    lr_scheduler: str = "cosine"
    """Decay after warm-up: linear, cosine or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    precision: str = "auto"
    """auto (bf16 where the hardware supports it, else fp32), bf16 (autocast) or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    compile: bool = False
    """torch.compile each decoder layer (needs g++): 0.86× the eager step time under bf16 (SmolLM2 DPO, 2 CPU cores), none in fp32, after a first step of 20–55 s."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: all-linear or a comma-separated list of module names."""
    merge_lora: bool = True
    """Save the final model with adapters merged (True) or as a separate adapter (False)."""
    logging_steps: int = 1
    """Append metrics to metrics.jsonl every this many steps."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    save_steps: int = 0
    """Write a checkpoint every this many steps (0: only on interruption, or of the last step before an error)."""
    save_total_limit: int = 2
    """Checkpoints to keep; older ones are deleted."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    overwrite: bool = False
    """Replace the run (finished or different) already in output_dir instead of refusing to start."""
    report_to: str = "none"
    """Extra tracker: none or tensorboard (metrics.jsonl is always written)."""
    sharding: str = "none"
    """none (each process holds the whole model: DDP) or fsdp (parameters, gradients and optimizer state sharded over the processes; see README "Scaling out")."""

    def validate(self) -> None:
        """Raise ConfigError for the first value no run could use."""
        # Choice lists are the keys of the modules that act on them, imported here so that
        # reading a config (and the CLI's --help) does not import torch.
        from posttrain.data.errors import invisible_character, is_blank
        from posttrain.data.load import OVERLONG
        from posttrain.models.precision import PRECISIONS
        from posttrain.trainers.sharding import SHARDING

        for name, kind in field_types(type(self)).items():  # 1e999 and .inf parse; no field means them
            _check(self, name, kind is not float or math.isfinite(getattr(self, name)), "must be a finite number")
        _check_choice(self, "precision", PRECISIONS)
        _check_choice(self, "lr_scheduler", SCHEDULERS)
        _check_choice(self, "overlong", OVERLONG)
        _check_choice(self, "report_to", ("none", "tensorboard"))
        _check_choice(self, "sharding", SHARDING)
        _check(self, "compile", not (self.compile and self.sharding == "fsdp"),
               "cannot be combined with sharding=fsdp yet (compile the layers or shard them, not both)")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_total_limit"):
            _check(self, name, getattr(self, name) >= 1, "must be ≥ 1")
        for name in ("max_steps", "eval_steps", "save_steps", "lora_r"):
            _check(self, name, getattr(self, name) >= 0, "must be ≥ 0")
        _check(self, "lr", self.lr > 0, "must be > 0")
        _check(self, "epochs", self.epochs > 0 or self.max_steps > 0, "must be > 0 when max_steps is 0")
        _check(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
        _check(self, "weight_decay", self.weight_decay >= 0, "must be ≥ 0")
        _check(self, "adam_eps", self.adam_eps > 0, "must be > 0")
        _check(self, "max_grad_norm", self.max_grad_norm >= 0, "must be ≥ 0")
        _check(self, "lora_alpha", self.lora_alpha > 0, "must be > 0")
        _check(self, "lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        for name, kind in field_types(type(self)).items():  # "" means none; " " or U+200B means nothing
            value = getattr(self, name)   # (but a newline is a stop string worth stopping at)
            _check(self, name, kind is not str or value == "" or name == "stop_strings" or not is_blank(value),
                   "is blank (only spaces or invisible characters): leave it empty or give a value")
        # Blank counts as empty: " " or a zero-width space would be a folder named by it.
        _check(self, "model", not is_blank(self.model), "must name a model")
        _check(self, "data", not is_blank(self.data), "must name a data file (--data)")
        _check(self, "output_dir", not is_blank(self.output_dir), "must name a folder")
        fields = field_types(type(self))
        for name in (n for n in PATH_FIELDS if n in fields):  # "s.jsonl\u200b": a file no one finds again
            hidden = invisible_character(getattr(self, name))
            _check(self, name, hidden is None, f"holds a hidden character, {hidden}; type the name again")

    def global_batch(self, world_size: int) -> int:
        """Records (or rows) per optimizer step across all processes and micro-batches."""
        return self.batch_size * self.grad_accum * world_size


@dataclass
class SFTConfig(TrainConfig):
    """Instruction tuning: next-token loss on completion / assistant tokens."""

    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    train_on_prompt: bool = False
    """Put loss on prompt tokens too, not only on completion / assistant tokens."""
    packing: bool = False
    """Pack several records per row (positions restart, attention stays inside each record)."""
    chat_template: str = ""
    """Give the model this chat template (chatml, FILE.jinja or from:MODEL), its tokens and EOS; replaces its own (empty: keep its own)."""

    def validate(self) -> None:
        from posttrain.models.chat_template import SPEC_HELP, is_chat_template_spec

        super().validate()
        _check(self, "chat_template", not self.chat_template or is_chat_template_spec(self.chat_template),
               f"is not one of {SPEC_HELP}")
        _check(self, "chat_template", not (self.chat_template and self.lora_r and not self.merge_lora),
               "needs merge_lora with LoRA: an unmerged adapter loads onto the original model, which lacks "
               "the template's tokens")


@dataclass
class RMConfig(TrainConfig):
    """Reward model: a scalar head on the LM, trained with the Bradley–Terry loss."""

    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    pairing: str = "all"
    """How scored lists become pairs: all (every better/worse pair) or best_vs_rest."""
    min_score_gap: float = 0.0
    """Scored lists form a pair only when the score gap exceeds this."""
    use_margin: bool = True
    """Subtract a record's "margin" inside the Bradley–Terry sigmoid when it has one."""
    center_coef: float = 0.0
    """Reward-centring coefficient: adds center_coef·(r_w + r_l)² to keep scores near 0."""
    prefix_sharing: bool = True
    """One row per pair (prompt, chosen, rejected) so the prompt is computed once; False: two rows."""

    def validate(self) -> None:
        from posttrain.data.formats import PAIRINGS

        super().validate()
        _check_choice(self, "pairing", PAIRINGS)
        _check(self, "min_score_gap", self.min_score_gap >= 0, "must be ≥ 0")
        _check(self, "center_coef", self.center_coef >= 0, "must be ≥ 0")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its variants, from preference pairs."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    loss: str = "sigmoid"
    """Preference loss: sigmoid (DPO), robust, ipo, hinge, simpo or orpo."""
    beta: float = 0.1
    """β: inverse temperature of the implicit reward β·log(π/π_ref)."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate for sigmoid (conservative DPO) and robust losses."""
    gamma: float = 0.5
    """SimPO's target reward margin γ."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training (cached on disk) and hold one model."""
    prefix_sharing: bool = True
    """One row per pair (prompt, chosen, rejected) so the prompt is computed once; False: two rows."""
    pairing: str = "all"
    """How scored lists become pairs: all (every better/worse pair) or best_vs_rest."""
    min_score_gap: float = 0.0
    """Scored lists form a pair only when the score gap exceeds this."""

    def validate(self) -> None:
        from posttrain.data.formats import PAIRINGS
        from posttrain.losses.dpo import DPO_LOSSES

        super().validate()
        _check_choice(self, "loss", tuple(DPO_LOSSES))
        _check_choice(self, "pairing", PAIRINGS)
        _check(self, "beta", self.beta > 0, "must be > 0")
        _check(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)")
        _check(self, "min_score_gap", self.min_score_gap >= 0, "must be ≥ 0")


@dataclass
class KTOConfig(TrainConfig):
    """KTO: unpaired thumbs-up / thumbs-down feedback (pairs count as one of each)."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    beta: float = 0.1
    """β: inverse temperature of the implicit reward β·log(π/π_ref) inside the sigmoid."""
    desirable_weight: float = 1.0
    """λ_D, the weight of desirable examples (the paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of undesirable examples."""
    pairing: str = "all"
    """How scored lists become pairs (each a desirable and an undesirable example): all or best_vs_rest."""
    min_score_gap: float = 0.0
    """Scored lists form a pair only when the score gap exceeds this."""

    def validate(self) -> None:
        from posttrain.data.formats import PAIRINGS

        super().validate()
        _check_choice(self, "pairing", PAIRINGS)
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            _check(self, name, getattr(self, name) > 0, "must be > 0")
        _check(self, "min_score_gap", self.min_score_gap >= 0, "must be ≥ 0")


@dataclass
class PPOConfig(TrainConfig):
    """RLHF with PPO: sample responses, score them, and take clipped policy-gradient steps."""

    lr: float = 3e-6
    """Peak learning rate of AdamW (policy and critic share one optimizer)."""
    max_length: int = 256
    """Longest prompt in tokens; longer prompts are left out and counted (never cut)."""
    overlong: str = "drop"
    """Prompts longer than max_length are dropped (the only choice for prompts)."""
    max_steps: int = 0
    """PPO iterations (rollout batch → updates) to run; 0 means derive from epochs."""
    grad_accum: int = 1
    """Must stay 1: PPO derives accumulation as rollout_batch_size / num_minibatches / processes / batch_size."""
    reward_model: str = ""
    """Reward model folder (posttrain rm output); exactly one of reward_model and reward_fn."""
    reward_fn: str = ""
    """Programmatic reward `module:function` (or `fn:module:function`), called f(prompts, responses) -> list of floats."""
    value_model: str = ""
    """Reward-model folder the critic starts from; empty: the reward model, or the policy with a zero head (reward_fn)."""
    value_head: bool = False
    """Put the value head on the policy network instead of a separate critic."""
    critic_lora_r: int = 0
    """LoRA rank of the separate critic (0 trains all its weights); alpha, dropout, targets as the policy's."""
    max_new_tokens: int = 64
    """Response tokens to sample at most."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature to match."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 samples from the full distribution)."""
    stop_strings: str = ""
    """Also stop a response at any of these strings, separated by '|' (EOS always stops)."""
    rollout_batch_size: int = 16
    """Prompts sampled per PPO iteration across all processes (one response each)."""
    num_minibatches: int = 1
    """Minibatches (optimizer steps) per PPO epoch over the rollout batch."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate: ratios outside [1 − ε, 1 + ε] get no gradient."""
    value_clip_eps: float = 0.2
    """Values may move at most this far from their rollout-time values before the loss is clipped."""
    vf_coef: float = 0.1
    """Weight of the value loss in the joint loss."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch (mean 0, variance 1)."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty (its start value when adaptive_kl_target > 0)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (log π/π_ref), k2 (½·log² π/π_ref) or k3 (π_ref/π − 1 − log π_ref/π)."""
    adaptive_kl_target: float = 0.0
    """Adapt β towards this KL per response (Ziegler et al. 2019); 0 keeps β fixed."""
    adaptive_kl_horizon: float = 10000.0
    """Horizon of the adaptive controller, in responses."""
    early_stop_kl: float = 0.0
    """Stop an iteration's PPO epochs when a minibatch's approximate KL to the rollout policy passes this (0: never)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit max_new_tokens without EOS or a stop string."""
    score_clip: float = 0.0
    """Clip scores to [−score_clip, score_clip] after normalisation (0: no clipping)."""
    normalize_scores: bool = False
    """Normalise scores by running mean and standard deviation over all rollouts so far."""
    samples_steps: int = 10
    """Append some prompts, responses and scores to samples.jsonl every this many iterations (0: never)."""

    def validate(self) -> None:
        from posttrain.losses.kl import KL_ESTIMATORS

        super().validate()
        _check(self, "overlong", self.overlong == "drop", "must be drop: prompts are never truncated")
        _check(self, "grad_accum", self.grad_accum == 1,
               "must be 1: PPO derives it from rollout_batch_size / num_minibatches / processes / batch_size")
        _check(self, "reward_model", bool(self.reward_model) != bool(self.reward_fn),
               "and reward_fn: give exactly one (--reward-model or --reward-fn)")
        _check(self, "reward_fn", not self.reward_fn or ":" in self.reward_fn, "must be module:function")
        _check(self, "value_model", not (self.value_head and self.value_model),
               "cannot be given with value_head (the head sits on the policy)")
        _check_choice(self, "kl_estimator", tuple(KL_ESTIMATORS))
        for name in ("max_new_tokens", "rollout_batch_size", "num_minibatches", "ppo_epochs"):
            _check(self, name, getattr(self, name) >= 1, "must be ≥ 1")
        for name in ("critic_lora_r", "samples_steps"):
            _check(self, name, getattr(self, name) >= 0, "must be ≥ 0")
        _check(self, "temperature", self.temperature > 0, "must be > 0")
        _check(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        for name in ("clip_eps", "value_clip_eps", "adaptive_kl_horizon"):
            _check(self, name, getattr(self, name) > 0, "must be > 0")
        for name in ("vf_coef", "kl_coef", "adaptive_kl_target", "early_stop_kl", "missing_eos_penalty",
                     "score_clip"):
            _check(self, name, getattr(self, name) >= 0, "must be ≥ 0")
        _check(self, "gamma", 0 <= self.gamma <= 1, "must be in [0, 1]")
        _check(self, "lam", 0 <= self.lam <= 1, "must be in [0, 1]")
        self.sizes(1)

    def sizes(self, world_size: int) -> tuple[int, int, int]:
        """(rollouts per process, rollouts per process per minibatch, micro-batches per minibatch)."""
        if self.rollout_batch_size % self.num_minibatches:
            raise ConfigError(f"config: rollout_batch_size={self.rollout_batch_size} does not divide into "
                              f"num_minibatches={self.num_minibatches}")
        minibatch = self.rollout_batch_size // self.num_minibatches
        if minibatch % world_size:
            raise ConfigError(f"config: a minibatch of {minibatch} rollouts (rollout_batch_size / "
                              f"num_minibatches) does not divide over {world_size} processes")
        local = minibatch // world_size
        if local % self.batch_size:
            raise ConfigError(f"config: a per-process minibatch of {local} rollouts does not divide into "
                              f"micro-batches of batch_size={self.batch_size}; give a batch_size that divides "
                              f"{local} (the largest below it: {_largest_divisor(local, self.batch_size)})")
        return self.rollout_batch_size // world_size, local, local // self.batch_size

    def global_batch(self, world_size: int) -> int:
        """Rollouts per optimizer step across all processes (one minibatch); ConfigError when the
        sizes do not divide over world_size processes."""
        _, per_process, _ = self.sizes(world_size)
        return per_process * world_size


@dataclass
class GRPOConfig(TrainConfig):
    """Online RL without a critic (GRPO): K samples per prompt, advantages relative to the group."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    max_length: int = 256
    """Longest prompt in tokens; longer prompts are left out and counted (never cut)."""
    overlong: str = "drop"
    """Prompts longer than max_length are dropped (the only choice for prompts)."""
    max_steps: int = 0
    """Iterations (rollout batch → updates) to run; 0 means derive from epochs."""
    grad_accum: int = 1
    """Must stay 1: derived as rollout_batch_size · num_generations / num_minibatches / processes / batch_size."""
    judges: str = ""
    """Comma-separated scorer specs summed into the reward: rm:PATH and/or fn:module:function."""
    judge_weights: str = ""
    """Comma-separated weights, one per judge (empty: every judge weighs 1)."""
    num_generations: int = 4
    """K: responses sampled per prompt (one group)."""
    rollout_batch_size: int = 8
    """Prompts per iteration across all processes; each is sampled num_generations times."""
    num_minibatches: int = 1
    """Optimizer steps per pass over the iteration's responses."""
    num_iterations: int = 1
    """μ: passes over each batch of responses (μ > 1 reuses them with the importance ratio)."""
    max_new_tokens: int = 64
    """Response tokens to sample at most."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature to match."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 samples from the full distribution)."""
    stop_strings: str = ""
    """Also stop a response at any of these strings, separated by '|' (EOS always stops)."""
    advantage: str = "grpo"
    """Advantage estimator: grpo (minus the group mean) or rloo (minus the mean of the other K − 1)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False is Dr. GRPO."""
    loss_type: str = "grpo"
    """Loss reduction: grpo (token mean per response, then mean), dapo (token mean over the batch) or dr_grpo (sum / (responses · max_new_tokens))."""
    clip_eps_low: float = 0.2
    """Lower clip ε of the ratio: 1 − ε."""
    clip_eps_high: float = 0.2
    """Upper clip ε of the ratio: 1 + ε (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """KL coefficient; 0 loads no reference model."""
    kl_in_reward: bool = False
    """Subtract β · Σ_t log π/π_ref from each response's reward (RLOO) instead of adding β · k3 to the loss (GRPO)."""
    drop_zero_variance: bool = False
    """Give no loss to groups whose rewards are all equal (they carry no signal; DAPO's dynamic sampling)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of a response cut off at max_new_tokens."""
    prefix_sharing: bool = True
    """A prompt's responses in one micro-batch share a row, so the prompt is computed once; False: a row each."""
    samples_steps: int = 10
    """Append some prompts, responses and rewards to samples.jsonl every this many iterations (0: never)."""

    def validate(self) -> None:
        from posttrain.advantages import ADVANTAGES
        from posttrain.ops import LOSS_TYPES

        super().validate()
        _check(self, "overlong", self.overlong == "drop", "must be drop: prompts are never truncated")
        _check(self, "grad_accum", self.grad_accum == 1, "must be 1: it is derived from the batch sizes")
        _check(self, "judges", bool(self.judge_specs()), "must name at least one scorer (rm:PATH or fn:module:function)")
        _check(self, "judge_weights", len(self.weights()) == len(self.judge_specs()),
               f"must give one weight per judge ({len(self.judge_specs())})")
        _check_choice(self, "advantage", tuple(ADVANTAGES))
        _check_choice(self, "loss_type", tuple(LOSS_TYPES))
        _check(self, "num_generations", self.num_generations >= 2,
               "must be ≥ 2: advantages are relative to the other samples of the prompt")
        for name in ("max_new_tokens", "rollout_batch_size", "num_minibatches", "num_iterations"):
            _check(self, name, getattr(self, name) >= 1, "must be ≥ 1")
        _check(self, "temperature", 0 < self.temperature < math.inf, "must be finite and > 0")
        _check(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        for name in ("clip_eps_low", "clip_eps_high"):
            _check(self, name, 0 < getattr(self, name) < 10, "must be in (0, 10)")
        for name in ("beta", "missing_eos_penalty", "samples_steps"):
            _check(self, name, getattr(self, name) >= 0, "must be ≥ 0")
        _check(self, "kl_in_reward", not (self.kl_in_reward and self.beta == 0), "needs beta > 0")
        self.sizes(1)

    def judge_specs(self) -> list[str]:
        """The judges' specs, in order."""
        return [spec.strip() for spec in self.judges.split(",") if spec.strip()]

    def weights(self) -> list[float]:
        """One weight per judge."""
        if not self.judge_weights.strip():
            return [1.0] * len(self.judge_specs())
        try:
            weights = [float(w) for w in self.judge_weights.split(",")]
        except ValueError:
            weights = [math.nan]
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"config: judge_weights={self.judge_weights!r} must be comma-separated finite numbers")
        return weights

    def sizes(self, world_size: int) -> tuple[int, int, int]:
        """(prompts per process, responses per process per minibatch, micro-batches per minibatch)."""
        if self.rollout_batch_size % world_size:
            raise ConfigError(f"config: rollout_batch_size={self.rollout_batch_size} prompts do not divide over "
                              f"{world_size} processes (each process samples whole groups)")
        local_prompts = self.rollout_batch_size // world_size
        responses = local_prompts * self.num_generations
        if responses % self.num_minibatches:
            raise ConfigError(f"config: {responses} responses per process do not divide into "
                              f"num_minibatches={self.num_minibatches}")
        minibatch = responses // self.num_minibatches
        if minibatch % self.batch_size:
            raise ConfigError(f"config: a minibatch of {minibatch} responses does not divide into micro-batches "
                              f"of batch_size={self.batch_size}; give a batch_size that divides {minibatch} "
                              f"(the largest below it: {_largest_divisor(minibatch, self.batch_size)})")
        return local_prompts, minibatch, minibatch // self.batch_size

    def global_batch(self, world_size: int) -> int:
        """Responses per optimizer step across all processes (one minibatch); ConfigError when the
        sizes do not divide over world_size processes."""
        _, per_process, _ = self.sizes(world_size)
        return per_process * world_size


@dataclass
class RLOOConfig(GRPOConfig):
    """Online RL without a critic (RLOO): K samples per prompt, a leave-one-out baseline, KL in the reward."""

    advantage: str = "rloo"
    """Advantage estimator: rloo (minus the mean of the other K − 1) or grpo (minus the group mean)."""
    scale_rewards: bool = False
    """Divide advantages by the group's reward std (off in the RLOO paper)."""
    beta: float = 0.05
    """KL coefficient of the KL-shaped reward r − β · Σ_t log π/π_ref."""
    kl_in_reward: bool = True
    """Subtract β · Σ_t log π/π_ref from each response's reward (RLOO) instead of adding β · k3 to the loss."""
    loss_type: str = "dr_grpo"
    """Loss reduction: dr_grpo (token sum / (responses · max_new_tokens): every token of every response weighs the same, as RLOO's estimator), grpo or dapo."""


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n not above at_most (1 at worst): a batch_size to suggest."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _check(cfg, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"config: {name}={getattr(cfg, name)!r} {why}")


def _check_choice(cfg, name: str, choices: tuple[str, ...]) -> None:
    _check(cfg, name, getattr(cfg, name) in choices, f"is not one of {', '.join(choices)}")


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def field_types(cls: type) -> dict[str, type]:
    """Resolved runtime type of every field (bool, int, float or str)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            raise TypeError(f"{cls.__name__}.{f.name}: config fields must have one plain type")
        out[f.name] = hint
    return out


# YAML 1.1 (PyYAML) reads `1e-4` and `5E3` as strings: its floats need a dot ("1.0e-4") and a
# signed exponent. YAML 1.2 and every user mean a number, so float fields take these strings.
YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
YAML12_INT = re.compile(r"[-+]?[0-9]+")
"""A quoted whole number ("8") as a YAML 1.2 int reads it: taken for an int field, as a quoted
"0.7" is for a float one."""


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
"""What a bool field reads from a word: a flag's word (--flag false) or a quoted YAML value ("false")."""


def coerce(cls: type, key: str, value, where: str):
    """Check one value from YAML against the field's type; ints are accepted for floats, quoted
    numbers for int and float fields, and a bool field takes the BOOL_WORDS a flag takes too (a
    quoted "false" is meant as false)."""
    kinds = field_types(cls)
    if key not in kinds:
        raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}")
    kind = kinds[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    if kind is int and isinstance(value, str) and YAML12_INT.fullmatch(value.strip()):
        return int(value)
    if kind is bool and isinstance(value, (str, int)) and str(value).strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[str(value).strip().lower()]  # "false", and 0/1 as YAML reads them unquoted
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: {key}={value!r} should be of type {kind.__name__}")
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, where PyYAML keeps the last
    one without a word (`max_steps: 1` then `max_steps: 2` ran 2 steps)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue   # SafeConstructor refuses it below, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(cls: type, path: str | Path) -> dict:
    """Read a YAML mapping of field values for `cls`, checking keys and types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'a folder, not a YAML file' if path.is_dir() else 'config file not found'}")
    try:
        # bytes: PyYAML names the offset of a non-UTF-8 byte
        raw = yaml.load(path.read_bytes(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not a config key name (a {type(key).__name__})")
    return {key.replace("-", "_"): coerce(cls, key.replace("-", "_"), value, str(path))
            for key, value in raw.items()}


def build_config(cls: type, yaml_path: str | None = None, overrides: dict | None = None):
    """defaults → YAML → flags, then validate."""
    values = load_yaml(cls, yaml_path) if yaml_path else {}
    from_yaml = set(values) - set(overrides or {})
    for key, value in (overrides or {}).items():
        values[key] = coerce(cls, key, value, "flag")
    cfg = cls(**values)
    try:
        cfg.validate()
    except ConfigError as err:
        # A value the YAML file gave is named by that file, as its type errors are.
        message = str(err)
        key = message.removeprefix("config: ").split("=", 1)[0]
        if message.startswith("config: ") and key in from_yaml:
            raise ConfigError(f"{yaml_path}: {message.removeprefix('config: ')}") from None
        raise
    return cfg


def to_yaml(cfg) -> str:
    """The resolved config as YAML, loadable again with --config."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig,
           "rloo": RLOOConfig, "kto": KTOConfig}
"""Command name → its config class; trainers add themselves here."""

__all__ = ["ConfigError", "TrainConfig", "SFTConfig", "RMConfig", "DPOConfig", "KTOConfig", "PPOConfig",
           "GRPOConfig", "RLOOConfig", "CONFIGS", "build_config", "field_docs",
           "field_types", "load_yaml", "to_yaml"]
