"""Load any Hugging Face causal LM and its tokenizer by hub id, local folder or built-in name."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.models.attention import ATTENTION
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


# A folder holds a model (config.json), a LoRA adapter, or at least a tokenizer.
FOLDER_MARKERS = ("config.json", "adapter_config.json", "tokenizer_config.json")


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be asked now: offline mode is set, or its host refuses a
    connection within 3 s. None when it may answer (the host did, or a proxy is set, which
    this probe cannot go through). Asked so that a missing name fails at once instead of after
    the hub client's ~50 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is set (HF_HUB_OFFLINE)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return f"{url.hostname} cannot be reached"
    return None


def looks_local(name: str) -> bool:
    """Whether `name` can only mean a local path: it starts with ".", "/" or "~", or, written as
    "a/b", its first part is a folder here (`out/nope` where ./out exists)."""
    return name.startswith((".", "/", "~")) or ("/" in name and Path(name.split("/")[0]).is_dir())


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name's cache folder, an existing local folder, or a hub id passed through.

    FileNotFoundError, at once, for a path that does not exist and either looks local
    (`looks_local`) or is a hub id not in the Hugging Face cache while the hub cannot be asked;
    ValueError for a file, an empty folder or one that holds no model, adapter or tokenizer.
    """
    if name_or_path in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name_or_path!r} is a file; expected a Hugging Face model folder")
        if not any(path.iterdir()):
            raise ValueError(f"model folder {name_or_path!r} is empty; expected a Hugging Face model folder "
                             "(config.json and weights)")
        if not any((path / marker).is_file() for marker in FOLDER_MARKERS):
            raise ValueError(f"model folder {name_or_path!r} holds no {' or '.join(FOLDER_MARKERS)}; "
                             "expected a Hugging Face model folder")
        return str(path)
    if looks_local(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder")
    if HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        from huggingface_hub import try_to_load_from_cache

        reason = hub_unreachable()
        if reason and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise FileNotFoundError(f"model {name_or_path!r}: no such folder, and not in the Hugging Face cache "
                                    f"while the hub cannot be asked ({reason})")
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
    """The causal LM with SDPA attention, per sequence on packed rows (posttrain.models.attention);
    fp32 by default, as trained weights are fp32 masters."""
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {LOAD_DTYPES}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        return _load_with_adapter(path, adapter, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION)


def _load_with_adapter(folder: str, adapter: Path, dtype: torch.dtype) -> PreTrainedModel:
    """A LoRA adapter folder (saved with merge_lora=False): its base model, named in
    adapter_config.json and resolved as any --model is, with the adapter merged in, so the
    result is a plain model every trainer and the sampler take as they take a merged folder."""
    from peft import PeftModel

    from posttrain.models.lora import without_peft_deprecation

    try:
        base_name = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{adapter}: not a LoRA adapter config naming its base model ({err!r})") from None
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{adapter}: base_model_name_or_path is {base_name!r}; the adapter's base model is unknown")
    base = load_causal_lm(base_name, dtype=dtype)
    with without_peft_deprecation():
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    # peft froze the base weights to load the adapter; the merged model is trainable as any loaded one.
    return merged.requires_grad_(True)


def cast_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the weight and bias of every nn.Linear in `model` in `dtype`, in place; returns `model`.

    For a frozen model run under autocast to `dtype` (the reference of DPO, KTO, PPO, GRPO): autocast
    casts exactly these tensors to `dtype` at every call, with the same round-to-nearest-even, so the
    outputs are bit-for-bit those of the fp32 model, while these weights take half the memory and no
    call pays the cast. What autocast leaves in fp32 stays fp32: norm weights and embeddings. An
    output head tied to the input embedding gets a frozen `dtype` copy of its own, since the LM
    heads posttrain runs (losses.chunked_logprobs) multiply in the autocast dtype too: the cast of
    SmolLM2's 49152 × 576 head took 14 ms of every reference forward, for 57 MB kept.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if id(module.weight) in embeddings:
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        else:
            module.to(dtype)
    return model
