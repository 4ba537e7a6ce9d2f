"""Padding and packing: tensor layout, and packed rows giving the same per-example losses as padded ones."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from posttrain.data import TokenizedExample, collate_packed, pack_examples, pad_batch, tokenize_conversation

PAD = 2


def ex(n: int, first: int = 10) -> TokenizedExample:
    """n tokens first, first+1, ...; loss on the second half."""
    return TokenizedExample(list(range(first, first + n)), [0 < i and i >= n // 2 for i in range(n)])


def test_pad_batch_layout():
    batch = pad_batch([ex(3), ex(5, first=20)], PAD)
    assert batch.input_ids.tolist() == [[10, 11, 12, PAD, PAD], [20, 21, 22, 23, 24]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert batch.loss_mask.tolist() == [[False, True, True, False, False], [False, False, True, True, True]]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.position_ids.dtype == torch.long


def test_pack_examples_best_fit_decreasing():
    examples = [ex(n) for n in (3, 7, 5, 2, 6, 1)]
    rows = pack_examples(examples, max_length=8)
    # Longest first: 7 opens row 0, 6 row 1, 5 row 2, 3 fits row 2 (room 3, tightest),
    # 2 fits row 1 (room 2), 1 fits row 0 (room 1).
    assert [[len(e.input_ids) for e in row] for row in rows] == [[7, 1], [6, 2], [5, 3]]
    assert pack_examples(examples, max_length=8) == rows  # deterministic
    with pytest.raises(ValueError, match=r"examples\[1\] has 7 tokens, more than max_length=6"):
        pack_examples(examples, max_length=6)


def test_collate_packed_layout():
    batch = collate_packed([[ex(3), ex(2, first=30)], [ex(4, first=40)]], PAD, max_length=8)
    assert batch.attention_mask is None
    assert batch.input_ids.tolist() == [[10, 11, 12, 30, 31], [40, 41, 42, 43, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, False, True], [False, False, True, True, False]]
    # transformers' own split of each row (what its packed-sequence mask is built from)
    # falls on the same boundaries: every example, and the padding tail, is its own block.
    assert find_packed_sequence_indices(batch.position_ids).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert batch.model_inputs()["use_cache"] is False
    with pytest.raises(ValueError, match="a row holds 5 tokens, more than max_length=4"):
        collate_packed([[ex(3), ex(2)]], PAD, max_length=4)


def test_first_token_cannot_be_a_target():
    with pytest.raises(ValueError, match="loss_mask\\[0\\] is True"):
        TokenizedExample([1, 2], [True, True])


def per_example_nll(model, batch) -> torch.Tensor:
    """Mean next-token NLL of each example, row by row in packing order."""
    logits = model(**batch.model_inputs()).logits
    # loss_mask[b, t] marks input_ids[b, t] as a target, predicted from the logits at t-1.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    # A new sequence starts wherever position_ids restart at 0 (numbered row by row); a padding
    # tail is a sequence of its own with no targets, so it drops out below.
    sequence = ((batch.position_ids == 0).flatten().cumsum(0) - 1).view_as(batch.position_ids)
    mask, sequence = batch.loss_mask[:, 1:], sequence[:, 1:]
    return torch.stack([nll[mask & (sequence == s)].mean() for s in sequence[mask].unique()])


def test_packed_losses_equal_padded_losses(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    model.eval()
    conversations = [
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help today?"},
         {"role": "user", "content": "Nothing."}, {"role": "assistant", "content": "Fine."}],
        [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}],
    ]
    examples = [tokenize_conversation(c, tokenizer) for c in conversations]
    rows = pack_examples(examples, max_length=140)
    assert max(len(row) for row in rows) >= 2  # at least one row really is packed
    packed_order = [e for row in rows for e in row]
    with torch.no_grad():
        packed = per_example_nll(model, collate_packed(rows, tokenizer.pad_token_id, 140))
        padded = per_example_nll(model, pad_batch(packed_order, tokenizer.pad_token_id))
        alone = torch.stack([per_example_nll(model, pad_batch([e], tokenizer.pad_token_id))[0] for e in packed_order])
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)

    # Why model_inputs() passes use_cache=False: with the config default (use_cache=True) the
    # model builds a cache, transformers skips packed-sequence detection, and the second
    # example of a packed row attends to the first.
    batch = collate_packed(rows, tokenizer.pad_token_id, 140)
    with torch.no_grad():
        leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        right = model(**batch.model_inputs()).logits
    later = batch.loss_mask & (batch.position_ids != torch.arange(batch.input_ids.shape[1]))
    assert later.any() and not torch.allclose(leaky[later], right[later], atol=1e-4)
