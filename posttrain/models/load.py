"""Load any Hugging Face causal LM and its tokenizer by hub id, local folder or built-in name."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.models.embedded import embedded_model_path
from posttrain.models.tiny import tiny_model_path

logger = logging.getLogger(__name__)

# name -> function returning the model's cache folder (building it on first call).
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": embedded_model_path,
    "tiny-random": tiny_model_path,
}

# "name" or "org/name", the hub's repo-id alphabet; paths ("./x", "/x", "~/x", "a/b/c") fail it.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")

# fp16 is deliberately absent (see precision.py); bf16 suits frozen reference / reward models.
LOAD_DTYPES = (torch.float32, torch.bfloat16)


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name's cache folder, an existing local folder, or a hub id passed through."""
    if name_or_path in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name_or_path!r} is a file; expected a Hugging Face model folder")
        return str(path)
    if HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        return name_or_path
    raise ValueError(
        f"model {name_or_path!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), "
        "an existing folder, or a hub id like 'org/name'"
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (its EOS if it had none) and a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer of {name_or_path!r} has no chat_template; posttrain renders every record as chat: "
            "give it one with `posttrain sft --chat-template chatml|FILE.jinja|from:MODEL`, or for the other "
            "trainers make a copy with `posttrain chat-template --model M --template chatml --output DIR`"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad token nor an eos token")
        # Padding positions are masked out of every loss, so any id works; EOS is the convention.
        logger.warning(
            "tokenizer of %r has no pad token; using its eos token %r", name_or_path, tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM with SDPA attention; fp32 by default, as trained weights are fp32 masters."""
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {LOAD_DTYPES}, got {dtype!r}")
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=dtype, attn_implementation="sdpa"
    )
