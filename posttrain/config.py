"""One flat config dataclass per trainer; YAML files and CLI flags fill them.

Precedence is defaults → YAML → flags. Every field carries a one-line docstring under it; the
CLI reads those docstrings for its --help, so the dataclass is the single place an option is
described. Validation runs before any model or data is loaded and raises one-line errors that
name the key and the offending value.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant")
OVERLONG = ("truncate", "drop")


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
    """Micro-batch size per process (records, or packed rows with --packing)."""
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
    """Write a checkpoint every this many steps (0: only on interruption)."""
    save_total_limit: int = 2
    """Checkpoints to keep; older ones are deleted."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    report_to: str = "none"
    """Extra tracker: none or tensorboard (metrics.jsonl is always written)."""

    def validate(self) -> None:
        """Raise ConfigError for the first value no run could use."""
        _check_choice(self, "precision", PRECISIONS)
        _check_choice(self, "lr_scheduler", SCHEDULERS)
        _check_choice(self, "overlong", OVERLONG)
        _check_choice(self, "report_to", ("none", "tensorboard"))
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
        _check(self, "model", bool(self.model), "must name a model")
        _check(self, "data", bool(self.data), "must name a data file (--data)")
        _check(self, "output_dir", bool(self.output_dir), "must name a folder")

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


PAIRINGS = ("all", "best_vs_rest")


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

    def validate(self) -> None:
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
        super().validate()
        _check_choice(self, "loss", ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"))
        _check_choice(self, "pairing", PAIRINGS)
        _check(self, "beta", self.beta > 0, "must be > 0")
        _check(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)")
        _check(self, "min_score_gap", self.min_score_gap >= 0, "must be ≥ 0")


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


def coerce(cls: type, key: str, value, where: str):
    """Check one value from YAML against the field's type; ints are accepted for floats."""
    kinds = field_types(cls)
    if key not in kinds:
        raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}")
    kind = kinds[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: {key}={value!r} should be of type {kind.__name__}")
    return value


def load_yaml(cls: type, path: str | Path) -> dict:
    """Read a YAML mapping of field values for `cls`, checking keys and types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return {key.replace("-", "_"): coerce(cls, key.replace("-", "_"), value, str(path))
            for key, value in raw.items()}


def build_config(cls: type, yaml_path: str | None = None, overrides: dict | None = None):
    """defaults → YAML → flags, then validate."""
    values = load_yaml(cls, yaml_path) if yaml_path else {}
    for key, value in (overrides or {}).items():
        values[key] = coerce(cls, key, value, "flag")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def to_yaml(cfg) -> str:
    """The resolved config as YAML, loadable again with --config."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig}
"""Command name → its config class; trainers add themselves here."""

__all__ = ["ConfigError", "TrainConfig", "SFTConfig", "RMConfig", "DPOConfig", "CONFIGS", "build_config", "field_docs",
           "field_types", "load_yaml", "to_yaml"]
