"""The reference model three ways: frozen copy, LoRA adapters off, precomputed cache."""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch

from posttrain.data import TokenizedPair
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.load import cast_linear_weights
from posttrain.models.lora import apply_lora
from posttrain.models.pairs import collate_pairs, sequence_logps
from posttrain.models.reference import (AdaptersOff, FrozenCopy, Precomputed, load_cached_logps, reference_cache_key,
                                        reference_mode, save_cached_logps)

PAIRS = [TokenizedPair([5, 6, 7], [8, 9], [10], None, 0), TokenizedPair([11], [12, 13, 14], [15, 16], None, 1)]


def batch(**kw):
    return collate_pairs(PAIRS, 2, prefix_sharing=True, **kw)


def test_mode_precedence():
    assert reference_mode(False, precompute=False, lora=True) == "none"
    assert reference_mode(True, precompute=True, lora=True) == "precomputed"
    assert reference_mode(True, precompute=False, lora=True) == "adapters_off"
    assert reference_mode(True, precompute=False, lora=False) == "frozen_copy"


def test_frozen_copy_is_independent_and_gradient_free(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ref = FrozenCopy(model, "cpu", nullcontext)
    before = ref.logps(batch())
    assert not ref.model.training and not any(p.requires_grad for p in ref.model.parameters())
    assert before[0].grad_fn is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    after = ref.logps(batch())
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    changed = sequence_logps(TokenLogprobs(model), batch(), "cpu")
    assert not torch.allclose(changed[0], before[0])


def test_adapters_off_gives_the_base_model_and_keeps_train_mode(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    base = sequence_logps(TokenLogprobs(model), batch(), "cpu")
    policy = TokenLogprobs(apply_lora(model, r=4, alpha=8, dropout=0.5, target_modules="all-linear")).train()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ref = AdaptersOff(policy, "cpu", nullcontext)
    chosen, rejected = ref.logps(batch())
    torch.testing.assert_close(chosen, base[0].detach())
    torch.testing.assert_close(rejected, base[1].detach())
    assert policy.training
    assert not torch.allclose(sequence_logps(policy.eval(), batch(), "cpu")[0], chosen)


def test_precomputed_reads_the_batch():
    table = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    chosen, rejected = Precomputed("cpu").logps(batch(ref_logps=table))
    assert chosen.tolist() == [-1.0, -3.0] and rejected.tolist() == [-2.0, -4.0]
    with pytest.raises(ValueError, match="ref_logps"):
        Precomputed("cpu").logps(batch())


def test_cache_key_follows_model_files_pairs_and_precision(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    key = reference_cache_key(str(model), PAIRS, "no")
    assert key == reference_cache_key(str(model), list(PAIRS), "no")
    assert key != reference_cache_key(str(model), PAIRS, "bf16")
    assert key != reference_cache_key(str(model), PAIRS[:1], "no")
    longer = [TokenizedPair([5, 6, 7], [8, 9, 2], [10], None, 0), PAIRS[1]]
    assert key != reference_cache_key(str(model), longer, "no")
    # Moving a token from the prompt into the reply changes the key although the ids concatenate alike.
    moved = [TokenizedPair([5, 6], [7, 8, 9], [10], None, 0), PAIRS[1]]
    assert key != reference_cache_key(str(model), moved, "no")
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key != reference_cache_key(str(model), PAIRS, "no")


def test_cache_round_trip_and_shape_check(tmp_path):
    path = tmp_path / "ref" / "k.safetensors"
    assert load_cached_logps(path, 2) is None
    table = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    save_cached_logps(path, table)
    torch.testing.assert_close(load_cached_logps(path, 2), table)
    assert [p.name for p in path.parent.iterdir()] == ["k.safetensors"]
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        load_cached_logps(path, 3)


def test_bf16_linear_weights_give_autocasts_log_probs_bit_for_bit(tiny_model_and_tokenizer):
    # Under bf16 autocast every Linear weight is cast to bf16 at each call; storing them in bf16
    # beforehand (a frozen reference under bf16 runs) must change nothing, not even one bit.
    model, _ = tiny_model_and_tokenizer
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    fp32 = FrozenCopy(model, "cpu", autocast)
    bf16 = FrozenCopy(model, "cpu", autocast)
    cast_linear_weights(bf16.model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in bf16.model.named_parameters()}
    assert dtypes["model.model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    # Left as autocast leaves them: norms and the embedding; the head tied to it gets its own
    # bf16 copy (posttrain's LM heads multiply in bf16 under autocast).
    assert dtypes["model.model.layers.0.input_layernorm.weight"] == torch.float32
    assert bf16.model.model.model.embed_tokens.weight.dtype == torch.float32
    head = bf16.model.model.lm_head.weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad
    assert torch.equal(head, model.lm_head.weight.to(torch.bfloat16))
    for a, b in zip(fp32.logps(batch()), bf16.logps(batch())):
        assert torch.equal(a, b)
