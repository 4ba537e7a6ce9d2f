import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.tiny import CHARS, build_tiny_model, build_tiny_tokenizer, tiny_model_path


def test_tokenizer_round_trips_ascii(tiny_tokenizer):
    text = "Hello, World!\n\tx = {'a': [1, 2]}  ~`|\\"
    ids = tiny_tokenizer.encode(text)
    assert len(ids) == len(text)  # one token per character, no BOS/EOS added
    assert tiny_tokenizer.decode(ids) == text
    every_char = "".join(CHARS)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(every_char)) == every_char


def test_tokenizer_special_tokens(tiny_tokenizer):
    assert len(tiny_tokenizer) == 3 + len(CHARS)
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == 2
    # specials are single ids; a non-ASCII char is <unk> (id 0)
    a = tiny_tokenizer.convert_tokens_to_ids("a")
    assert tiny_tokenizer.encode("<|im_start|>a<|im_end|>") == [1, a, 2]
    assert tiny_tokenizer.encode("é") == [tiny_tokenizer.unk_token_id] == [0]
    assert tiny_tokenizer.decode([1, 68, 2], skip_special_tokens=True) == tiny_tokenizer.decode([68])


def test_chat_template_is_chatml_without_default_system(tiny_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    with_system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = tiny_tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_forward_backward(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    assert model.config.max_position_embeddings >= 1024
    assert model.dtype == torch.float32
    input_ids = torch.tensor([tokenizer.encode("abcdef"), tokenizer.encode("ghijkl")])  # B=2, T=6
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 6, len(tokenizer))  # B, T, V
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_is_seeded_fast_and_leaves_global_rng_alone(tiny_tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    start = time.perf_counter()
    a = build_tiny_model(tiny_tokenizer, seed=0)
    elapsed = time.perf_counter() - start
    assert torch.rand(1) == expected_next
    b = build_tiny_model(tiny_tokenizer, seed=0)
    c = build_tiny_model(tiny_tokenizer, seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert elapsed < 1.0


def test_tiny_model_path_reloads_with_auto_classes(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    fresh_tokenizer = build_tiny_tokenizer()
    fresh_model = build_tiny_model(fresh_tokenizer, seed=0)
    assert tokenizer.chat_template == fresh_tokenizer.chat_template
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    input_ids = torch.tensor([tokenizer.encode("round trip")])
    torch.testing.assert_close(model(input_ids).logits, fresh_model(input_ids).logits, rtol=0, atol=0)


def test_tiny_model_path_writes_once(tmp_path):
    path = tiny_model_path(tmp_path)
    assert path == tmp_path / "tiny-random"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]  # no .tmp-* left behind


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    assert tiny_model_path() == tmp_path / "tiny-random"


@pytest.mark.parametrize("text", ["", "a", "\n\n"])
def test_tokenizer_edge_strings(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
