"""Shared fixtures: the tiny random model (fast, fresh per test) and the embedded SmolLM2 (converted once).

Cached models live under `$POSTTRAIN_CACHE` if set, else ~/.cache/posttrain, so the one-off
GGUF conversion (~10 s) happens once per machine, not once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models.cache import cache_root
from posttrain.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_model_path


@pytest.fixture(scope="session")
def posttrain_cache() -> Path:
    """The cache root every built-in model resolves into for this session."""
    return cache_root()


@pytest.fixture
def tiny_tokenizer():
    """A fresh character-level ChatML tokenizer (pad == eos == <|im_end|>); builds in ~1 ms."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_and_tokenizer():
    """A fresh seed-0 tiny Llama (fp32, tied embeddings) and its tokenizer; tests may mutate both."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


@pytest.fixture(scope="session")
def tiny_path(posttrain_cache: Path) -> Path:
    """The tiny model saved as an ordinary HF folder (`<cache>/tiny-random`)."""
    return tiny_model_path(posttrain_cache)


@pytest.fixture(scope="session")
def smollm2_path(posttrain_cache: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors HF folder, converted from GGUF once."""
    from posttrain.models.embedded import embedded_model_path

    return embedded_model_path(posttrain_cache)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny model's matmuls are too small to share, a
    second thread only waits for the first, and on a busy machine that wait dominates (about
    7× slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
