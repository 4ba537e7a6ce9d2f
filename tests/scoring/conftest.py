"""Fixtures for the scorers: one thread for the tiny model, a saved tiny reward model, and a
samples file as `posttrain sample` writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models.reward import RewardModel
from scoring_helpers import SAMPLES, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to share: a second thread only waits for the
    first, and on a busy machine that wait dominates (about 7× slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rm_folder(tmp_path_factory, tiny_path) -> Path:
    """A tiny reward model (seed-1 head) saved as `posttrain rm` saves one."""
    return RewardModel.from_causal_lm(str(tiny_path), seed=1).save_pretrained(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture
def samples_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
