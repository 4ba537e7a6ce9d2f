"""Preference pairs as model inputs: prefix-shared rows give the plain two-row log-probs."""

from __future__ import annotations

import pytest
import torch

from posttrain.data import TokenizedPair, load_preference_pairs
from posttrain.models.attention import members_mask
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.pairs import collate_pairs, sequence_logps


def random_pairs(lengths: list[tuple[int, int, int]], vocab: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), None, i) for i, (p, c, r) in enumerate(lengths)]


# Unequal prompts and replies, 1-token replies, rejected longer and shorter than chosen: every
# row of the shared layout gets padding and every alignment edge is exercised.
LENGTHS = [(7, 5, 9), (3, 8, 2), (12, 1, 1), (1, 4, 6)]


def both_layouts(policy, pairs, pad_id):
    shared = sequence_logps(policy, collate_pairs(pairs, pad_id, prefix_sharing=True), "cpu")
    plain = sequence_logps(policy, collate_pairs(pairs, pad_id, prefix_sharing=False), "cpu")
    return shared, plain


def test_prefix_shared_logps_and_gradients_equal_plain_on_tiny(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    policy = TokenLogprobs(model)
    pairs = random_pairs(LENGTHS, len(tok))
    (sc, sr), (pc, pr) = both_layouts(policy, pairs, tok.pad_token_id)
    torch.testing.assert_close(sc, pc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sr, pr, atol=1e-5, rtol=1e-5)
    grads = []
    for chosen, rejected in ((sc, sr), (pc, pr)):
        policy.zero_grad()
        (chosen.sum() - 2 * rejected.sum()).backward(retain_graph=True)
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.embedded
def test_prefix_shared_logps_equal_plain_on_smollm2(smollm2_path):
    from posttrain.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(smollm2_path)), load_causal_lm(str(smollm2_path))
    records = [{"prompt": "What is 2+3?", "chosen": "5.", "rejected": "It is 6, I think."},
               {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "No."}]
    pairs = [TokenizedPair(*_tokenized(tok, r), None, i) for i, r in enumerate(records)]
    with torch.no_grad():
        (sc, sr), (pc, pr) = both_layouts(TokenLogprobs(model), pairs, tok.pad_token_id)
    torch.testing.assert_close(sc, pc, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(sr, pr, atol=2e-3, rtol=1e-4)


def _tokenized(tok, record):
    from posttrain.data import preference_pairs, tokenize_pair

    (pair,) = preference_pairs(record, source="test", index=0)
    t = tokenize_pair(pair, tok)
    return t.prompt_ids, t.chosen_ids, t.rejected_ids


def test_shared_mask_keeps_rejected_from_chosen_and_continues_positions():
    (pair,) = random_pairs([(3, 2, 2)], 50)
    batch = collate_pairs([pair], 0, prefix_sharing=True)
    # Row: x0 x1 x2 | c0 c1 | p r0 r1, with p a copy of x2 at position 2.
    assert batch.input_ids[0].tolist() == pair.prompt_ids + pair.chosen_ids + pair.prompt_ids[-1:] + pair.rejected_ids
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4]
    assert batch.chosen_mask[0].tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert batch.rejected_mask[0].tolist() == [False] * 6 + [True] * 2
    assert batch.attention_mask[0].int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1, 1, 1]]
    mask = members_mask(batch.attention_mask)[0, 0].int().tolist()
    assert mask[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # c0: prompt and itself
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0, 0]  # p: x0, x1 and itself, as x2 had
    assert mask[7] == [1, 1, 0, 0, 0, 1, 1, 1]  # r1: x0, x1, p, r0, r1, never chosen
    assert batch.chosen_lengths.tolist() == [2.0] and batch.rejected_lengths.tolist() == [2.0]


def test_padding_rows_give_no_nan(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    pairs = random_pairs([(2, 1, 1), (20, 10, 10)], len(tok))
    chosen, rejected = sequence_logps(TokenLogprobs(model), collate_pairs(pairs, 2, prefix_sharing=True), "cpu")
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()


def test_empty_reply_is_refused():
    pair = TokenizedPair([5, 6], [], [7], None, 3)
    with pytest.raises(ValueError, match="record 3"):
        collate_pairs([pair], 0, prefix_sharing=True)


def test_loaded_pairs_collate_in_both_layouts(tmp_path, tiny_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "responses": ["a", "bb", "ccc"], "scores": [1, 3, 2]}\n')
    pairs, _ = load_preference_pairs(str(path), tiny_tokenizer, max_length=64)
    assert len(pairs) == 3
    shared = collate_pairs(pairs, tiny_tokenizer.pad_token_id, prefix_sharing=True)
    plain = collate_pairs(pairs, tiny_tokenizer.pad_token_id, prefix_sharing=False)
    assert shared.input_ids.shape[0] == 3 and plain.input_ids.shape[0] == 6
    assert int(shared.chosen_mask.sum()) == int(plain.chosen_mask.sum()) == int(shared.chosen_lengths.sum())
