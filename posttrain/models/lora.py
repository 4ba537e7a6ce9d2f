"""LoRA adapters (via peft), the base model as a free reference, and saving for reload."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextlib.contextmanager
def without_peft_deprecation() -> Iterator[None]:
    """Within the block, transformers' FutureWarning for `is_gradient_checkpointing` is not shown:
    peft 0.21 asks every model it wraps or loads an adapter into for that deprecated alias, so the
    warning came with every LoRA run and adapter folder, and nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def parse_target_modules(target_modules: str) -> str | list[str]:
    """"all-linear" as is, else a comma list "q_proj,v_proj" -> ["q_proj", "v_proj"]."""
    if target_modules == "all-linear":
        return target_modules
    names = [name.strip() for name in target_modules.split(",") if name.strip()]
    if not names:
        raise ValueError(
            f"target_modules must be 'all-linear' or a comma list of module names, got {target_modules!r}"
        )
    return names


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: float, dropout: float, target_modules: str,
    task_type: str = "CAUSAL_LM", trainable_tokens: Sequence[int] = (),
) -> PeftModel:
    """Wrap `model` with LoRA adapters (Hu et al. 2021); only adapter weights stay trainable.

    The adapter update is (alpha / r) * B @ A with B initialised to zero, so the wrapped model
    starts out computing exactly what the base did. "all-linear" (peft) covers every linear
    layer except the output head, which stays tied to the embeddings. task_type="SEQ_CLS"
    (a reward or value model) keeps its `score` head fully trainable (peft modules_to_save).

    trainable_tokens: ids whose embedding rows (input, and an untied output head's) train too:
    tokens a chat template added start as the mean row and must learn their role. The matrices
    are unfrozen with a gradient hook that zeroes every other row, so the pretrained rows get
    no update (unless weight_decay > 0: AdamW's decoupled decay still shrinks them). Not peft's
    trainable_token_indices: TokenLogprobs reads the head's weight directly, past peft's
    wrapper. The rows live in the base weights, so only a merged save keeps them.
    """
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        task_type=task_type,
    )
    with without_peft_deprecation():
        peft_model = get_peft_model(model, config)
    if trainable_tokens:
        train_rows(model, trainable_tokens)
    return peft_model


def train_rows(model: PreTrainedModel, rows: Sequence[int]) -> None:
    """Make `rows` of the input embeddings and of an untied output head trainable, and no other row."""
    index = torch.tensor(sorted(set(rows)), dtype=torch.long)

    def only_rows(grad: torch.Tensor) -> torch.Tensor:  # grad: [V, H]
        kept = torch.zeros_like(grad)
        at = index.to(grad.device)  # the model may have moved to an accelerator since
        kept[at] = grad[at]
        return kept

    weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    for weight in weights.values():
        weight.requires_grad_(True)
        weight.register_hook(only_rows)


@contextlib.contextmanager
def disabled_adapters(model: PeftModel) -> Iterator[PeftModel]:
    """Within the block `model` computes its base model's outputs: a reference model for free."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"disabled_adapters needs a peft model, got {type(model).__name__}")
    with model.disable_adapter():
        yield model


def save_model(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = True,
) -> Path:
    """Save model and tokenizer to `out_dir` as safetensors; returns the folder.

    A LoRA model is, by default, merged into its base (on a copy, so `model` keeps training),
    giving a plain folder that AutoModelForCausalLM loads as is. With merge_lora=False only the
    adapter is written; its adapter_config.json names the base folder or hub id to load under it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel) and merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    elif isinstance(model, PeftModel):
        base = model.peft_config[model.active_adapter].base_model_name_or_path
        if not base:
            raise ValueError(
                "unmerged LoRA save needs a base model loaded from a folder or hub id; this one was built in memory"
            )
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
