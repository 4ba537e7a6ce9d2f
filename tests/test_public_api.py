"""The names the README promises are importable from `posttrain` directly, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import posttrain


@pytest.mark.parametrize("name", posttrain.__all__)
def test_every_public_name_resolves(name):
    assert getattr(posttrain, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'train_sftt'"):
        posttrain.train_sftt  # noqa: B018


def test_import_posttrain_does_not_load_torch():
    code = "import sys, posttrain; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_trainers_and_configs_match():
    from posttrain.trainers import grpo, sft

    assert posttrain.train_sft is sft.train and posttrain.train_rloo is grpo.train
    assert posttrain.SFTConfig().model == "smollm2-135m-instruct"
