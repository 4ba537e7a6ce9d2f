import pytest
import torch

from posttrain.models import precision
from posttrain.models.precision import autocast, cpu_supports_bf16, resolve_precision


def test_fp32_always_resolves():
    assert resolve_precision("fp32") == "fp32"


def test_auto_follows_hardware(monkeypatch):
    assert resolve_precision("auto") == ("bf16" if cpu_supports_bf16() else "fp32")
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("bf16") == "bf16"


def test_bf16_on_unsupported_hardware_fails(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_precision("bf16")


@pytest.mark.parametrize("name", ["fp16", "float16", "BF16", ""])
def test_unknown_precision_fails(name):
    with pytest.raises(ValueError, match=repr(name)):
        resolve_precision(name)


def test_unknown_device_fails():
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_precision("auto", device_type="tpu")


def test_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="'auto'"):
        autocast("auto")
