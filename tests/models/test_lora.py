import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models import load_causal_lm
from posttrain.models.lora import apply_lora, disabled_adapters, parse_target_modules, save_model


def perturb_adapters(model):
    """LoRA B starts at zero (adapter is a no-op); give it weight so the tests can tell."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def lora_model(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    input_ids = torch.tensor([tokenizer.encode("hello world")])  # B=1, T=11
    with torch.no_grad():
        base_logits = model(input_ids).logits
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    return lora, tokenizer, input_ids, base_logits


def test_only_adapters_trainable_and_start_as_base(lora_model):
    model, _, input_ids, base_logits = lora_model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # all-linear: q,k,v,o,gate,up,down in each of 2 layers, A and B each; lm_head excluded
    assert len(trainable) == 2 * 7 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base_logits, rtol=0, atol=0)


def test_wrapping_prints_no_deprecation_of_the_libraries(tiny_model_and_tokenizer):
    # peft asks transformers' deprecated is_gradient_checkpointing on every wrap (a fresh user's finding)
    model, _ = tiny_model_and_tokenizer
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    assert not [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_disabled_adapters_give_base_outputs(lora_model):
    model, _, input_ids, base_logits = lora_model
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(input_ids).logits
        with disabled_adapters(model):
            reference = model(input_ids).logits
        again = model(input_ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(reference, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_disabled_adapters_needs_peft(tiny_model_and_tokenizer):
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        with disabled_adapters(tiny_model_and_tokenizer[0]):
            pass


def test_merged_save_reloads_with_auto_classes(lora_model, tmp_path):
    model, tokenizer, input_ids, _ = lora_model
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(input_ids).logits
    save_model(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        # merging folds (alpha/r) B A into W: equal up to fp32 rounding
        torch.testing.assert_close(reloaded(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)
        # the live model still has its adapters (merged a copy) and gives the same outputs
        torch.testing.assert_close(model(input_ids).logits, adapted, rtol=0, atol=0)
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_unmerged_save_points_at_base(tiny_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    base = load_causal_lm(str(tiny_path))
    model = apply_lora(base, r=2, alpha=4, dropout=0.1, target_modules="q_proj,v_proj")
    perturb_adapters(model)
    model.eval()
    input_ids = torch.tensor([tokenizer.encode("adapter")])
    with torch.no_grad():
        adapted = model(input_ids).logits
    save_model(model, tokenizer, tmp_path, merge_lora=False)
    assert (tmp_path / "adapter_config.json").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)
    # posttrain's own loader merges it, as quietly as apply_lora wraps (a fresh user's finding)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        merged = load_causal_lm(str(tmp_path))
    assert not [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_unmerged_save_of_in_memory_base_fails(lora_model, tmp_path):
    model, tokenizer, _, _ = lora_model
    with pytest.raises(ValueError, match="built in memory"):
        save_model(model, tokenizer, tmp_path, merge_lora=False)


def test_parse_target_modules():
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="' , '"):
        parse_target_modules(" , ")
