"""Fixtures for the scorers: one thread for the tiny model, a saved tiny reward model, and a
samples file as `posttrain sample` writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.models.reward import RewardModel
from scoring_helpers import SAMPLES, write_jsonl


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every scoring test runs on one thread (see `one_thread` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def rm_folder(tmp_path_factory, tiny_path) -> Path:
    """A tiny reward model (seed-1 head) saved as `posttrain rm` saves one."""
    return RewardModel.from_causal_lm(str(tiny_path), seed=1).save_pretrained(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture
def samples_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
