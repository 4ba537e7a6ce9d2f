"""Padding-free passes (posttrain.models.attention): the ground truth is each sequence run alone,
as one unpadded row, through the same decoder; a padded, packed or per-sequence pass must give
its hidden states and gradients at every real token."""

import pytest
import torch

from posttrain.data import TokenizedPair
from posttrain.models import attention
from posttrain.models.attention import (ATTENTION, CausalSequences, decoder_hidden, eager_attention, members_mask,
                                       sequence_starts, varlen_sdpa_attention)
from posttrain.models.pairs import collate_pairs


def alone(decoder, ids: list[int]) -> torch.Tensor:
    """[L,H]: one sequence as a row of its own, no mask, positions 0 … L−1."""
    row = torch.tensor([ids])
    return decoder(input_ids=row, position_ids=torch.arange(len(ids))[None], use_cache=False).last_hidden_state[0]


def padded(sequences: list[list[int]], left: list[bool], pad_id: int):
    """[B,T] ids, padding mask and positions counted over real tokens, each row padded on its side."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, on_left) in enumerate(zip(sequences, left)):
        cols = slice(width - len(seq), width) if on_left else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def decoder(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    assert model.config._attn_implementation == ATTENTION
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query, as SmolLM2
    return model.get_decoder()


SEQUENCES = [[5, 9, 14, 3, 7, 22, 8], [11, 4, 6], [30, 2, 19, 25, 1], [17]]


@pytest.fixture
def calls(decoder, monkeypatch) -> list[dict]:
    """The keyword arguments of every decoder forward a test makes."""
    seen = []
    forward = type(decoder).forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", spy)
    return seen


@pytest.fixture(params=["eager", "flash"])
def backend(request, monkeypatch):
    """Both attentions decoder_hidden picks from (eager_attention for rows up to EAGER_MAX_LENGTH
    tokens, SDPA's flash kernel above)."""
    if request.param == "flash":
        monkeypatch.setattr(attention, "EAGER_MAX_LENGTH", 0)
    return request.param


def test_padded_batch_equals_each_sequence_alone(decoder, backend):
    ids, mask, positions = padded(SEQUENCES, left=[False, True, True, False], pad_id=0)
    hidden = decoder_hidden(decoder, ids, mask, positions)
    assert hidden.shape == (*ids.shape, decoder.config.hidden_size)
    for row, seq in enumerate(SEQUENCES):
        torch.testing.assert_close(hidden[row][mask[row].bool()], alone(decoder, seq), atol=1e-5, rtol=1e-5)
    assert hidden[~mask.bool()].abs().max() == 0  # padding columns are zero, not some token's state


def test_gradients_equal_each_sequence_alone(decoder, backend):
    ids, mask, positions = padded(SEQUENCES, left=[True, False, True, False], pad_id=0)
    weights = torch.randn(*ids.shape, decoder.config.hidden_size)
    (decoder_hidden(decoder, ids, mask, positions) * weights).sum().backward()
    batched = {name: p.grad.clone() for name, p in decoder.named_parameters()}
    decoder.zero_grad(set_to_none=True)
    total = sum((alone(decoder, seq) * weights[row][mask[row].bool()]).sum() for row, seq in enumerate(SEQUENCES))
    total.backward()
    for name, p in decoder.named_parameters():
        # fp32 sums over the same tokens in another order: within 1e-5 of each tensor's largest entry.
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(batched[name], p.grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_packed_rows_equal_each_sequence_alone(decoder):
    # Two rows: [seq0 seq1 pad pad] and [seq2 seq3 pad…]; positions restart for every sequence and
    # for the padding tail (collate_packed's layout).
    rows = [[SEQUENCES[0], SEQUENCES[1]], [SEQUENCES[2], SEQUENCES[3]]]
    width = 12
    ids = torch.zeros((2, width), dtype=torch.long)
    positions = torch.zeros((2, width), dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start = 0
        for seq in row:
            ids[r, start:start + len(seq)] = torch.tensor(seq)
            positions[r, start:start + len(seq)] = torch.arange(len(seq))
            spans.append((r, start, seq))
            start += len(seq)
        positions[r, start:] = torch.arange(width - start)
    hidden = decoder_hidden(decoder, ids, None, positions)
    for r, start, seq in spans:
        torch.testing.assert_close(hidden[r, start:start + len(seq)], alone(decoder, seq), atol=1e-5, rtol=1e-5)


def test_padded_batch_runs_as_one_row_of_real_tokens(decoder, calls):
    ids, mask, positions = padded(SEQUENCES, left=[False] * 4, pad_id=0)
    decoder_hidden(decoder, ids, mask, positions)
    # 7 + 3 + 5 + 1 = 16 real tokens of 4 × 7 columns; the sequences start at 0, 7, 10, 15.
    assert tuple(calls[0]["input_ids"].shape) == (1, 16)
    index = calls[0]["causal_sequences"].index
    assert index[:, 0].tolist() == [0, 7, 10, 15] and index[0].tolist() == list(range(7))


def test_little_padding_and_4d_masks_go_as_they_are(decoder, backend, calls):
    ids = torch.tensor([SEQUENCES[0][:3], SEQUENCES[2][:3]])
    positions = torch.arange(3).expand(2, 3)
    full = decoder_hidden(decoder, ids, torch.ones_like(ids), positions)  # no padding
    causal = torch.ones(3, 3, dtype=torch.bool).tril().expand(2, 1, 3, 3)
    torch.testing.assert_close(decoder_hidden(decoder, ids, causal, positions), full, atol=1e-5, rtol=1e-5)
    # 3 padding columns of 3 × 7 = 14 %: packed; of 4 × 7 = 11 % (below MIN_PADDING = 1/8): as it is.
    for sequences, packed in (([SEQUENCES[0], SEQUENCES[0], SEQUENCES[0][:4]], True),
                              ([SEQUENCES[0]] * 3 + [SEQUENCES[0][:4]], False)):
        calls.clear()
        ids, mask, positions = padded(sequences, left=[True] * len(sequences), pad_id=0)
        hidden = decoder_hidden(decoder, ids, mask, positions)
        assert [tuple(c["input_ids"].shape) for c in calls] == [(1, int(mask.sum())) if packed else tuple(ids.shape)]
        for row, seq in enumerate(sequences):
            torch.testing.assert_close(hidden[row][mask[row].bool()], alone(decoder, seq), atol=1e-5, rtol=1e-5)


def test_varlen_attention_is_causal_within_each_sequence(backend):
    # 2 query heads over 1 key/value head; sequences of 3 and 2 tokens in one row.
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    sequences = CausalSequences.of(torch.tensor([[[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]]], dtype=torch.bool))
    out, weights = varlen_sdpa_attention(torch.nn.Module(), query, key, value, None, scaling=0.5,
                                         causal_sequences=sequences)
    assert weights is None and out.shape == (1, 5, 2, 4)
    # Query 3 (the second sequence's first token) sees key 3 only: its output is value 3, per head.
    torch.testing.assert_close(out[0, 3], value[0, 0, 3].expand(2, 4))
    # Query 2 attends to keys 0, 1, 2 with softmax(0.5 · q·k) weights, by hand.
    for head in range(2):
        scores = 0.5 * key[0, 0, :3] @ query[0, head, 2]
        torch.testing.assert_close(out[0, 2, head], torch.softmax(scores, 0) @ value[0, 0, :3])


def grouped_qkv(dtype=torch.float32):
    """6 query heads over 2 key/value heads (query heads 0–2 read key/value head 0), 2 rows × 7."""
    torch.manual_seed(0)
    return [torch.randn(2, heads, 7, 8, dtype=dtype, requires_grad=True) for heads in (6, 2, 2)]


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float"])
def test_eager_attention_equals_sdpa(mask_kind):
    query, key, value = grouped_qkv()
    allowed = torch.rand(2, 1, 7, 7) < 0.6
    allowed |= torch.eye(7, dtype=torch.bool)  # every query sees at least itself: SDPA gives no NaN
    mask = {"causal": None, "bool": allowed, "float": torch.randn(2, 1, 7, 7)}[mask_kind]
    out = eager_attention(query, key, value, mask, scaling=0.3)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                is_causal=mask is None, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (query, key, value))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_eager_attention_in_bf16_stays_near_flash():
    # bf16 products and fp32 softmax, as flash attention: the outputs differ by bf16 rounding only.
    query, key, value = grouped_qkv(torch.bfloat16)
    out = eager_attention(query, key, value, None, scaling=8 ** -0.5)
    assert out.dtype == torch.bfloat16
    flash = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.float(), flash.float(), atol=2e-2, rtol=2e-2)


def test_eager_attention_row_with_no_key_is_finite():
    # SDPA gives NaN for a query that may attend to nothing (a padding column of a left-padded
    # row); eager_attention gives finite values, which decoder_hidden then drops, and finite gradients.
    query, key, value = grouped_qkv()
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
    mask[1, 0, 2] = False
    out = eager_attention(query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out[1, :, 2], value[1].repeat_interleave(3, 0).mean(1))  # uniform over all keys
    out[:, :, 3:].sum().backward()
    assert all(t.grad.isfinite().all() for t in (query, key, value))


def test_sequence_starts_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert sequence_starts(positions).tolist() == [[True, False, False, True, False, True],
                                                   [True, False, True, False, False, False]]


def test_padding_between_real_tokens_is_refused(decoder):
    ids = torch.tensor([[5, 9, 14, 3], [11, 4, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask row 1 has padding between real tokens"):
        decoder_hidden(decoder, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))


def test_a_model_with_plain_sdpa_still_keeps_sequences_apart(tiny_model_and_tokenizer):
    # Not loaded by posttrain: no cu_seq_lens reader, so transformers' packed-sequence mask does the work.
    model, _ = tiny_model_and_tokenizer
    model.set_attn_implementation("sdpa")
    decoder = model.get_decoder()
    ids, mask, positions = padded(SEQUENCES, left=[True, False, False, True], pad_id=0)
    hidden = decoder_hidden(decoder, ids, mask, positions)
    for row, seq in enumerate(SEQUENCES):
        torch.testing.assert_close(hidden[row][mask[row].bool()], alone(decoder, seq), atol=1e-5, rtol=1e-5)


def shared_prompt_batch():
    """One row [prompt | reply A | reply B] whose sequences share the prompt: 0 = prompt + A,
    1 = prompt + B with B's positions continuing from the prompt (the prefix-shared pairs' form
    without the copied token); a second row of one sequence and padding."""
    prompt, a, b = [5, 9, 14], [3, 7], [22, 8, 30]
    ids = torch.tensor([prompt + a + b, [11, 4, 6, 0, 0, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 0, 0, 0, 0, 0]])
    members = torch.zeros(2, 2, 8, dtype=torch.bool)
    members[0, 0, :5] = members[0, 1, :3] = members[0, 1, 5:] = members[1, 0, :3] = True
    truth = [(0, slice(0, 5), prompt + a), (0, slice(5, 8), prompt + b), (1, slice(0, 3), [11, 4, 6])]
    return ids, members, positions, truth


def check_shared(decoder, hidden, truth):
    for row, cols, seq in truth:
        want = alone(decoder, seq)[-(cols.stop - cols.start):]  # B's states come after the prompt's
        torch.testing.assert_close(hidden[row, cols], want, atol=1e-5, rtol=1e-5)


def test_shared_columns_are_computed_once_and_seen_by_both_sequences(decoder, backend, calls):
    ids, members, positions, truth = shared_prompt_batch()
    hidden = decoder_hidden(decoder, ids, members, positions)
    assert [tuple(c["input_ids"].shape) for c in calls] == [(1, 11)]  # 8 + 3 real columns, the prompt once
    check_shared(decoder, hidden, truth)
    assert hidden[1, 3:].abs().max() == 0
    # The gradient reaches the shared prompt from both sequences: equal to the two sequences alone.
    weights = torch.randn_like(hidden)
    decoder.zero_grad(set_to_none=True)
    (hidden * weights).sum().backward()
    shared = {name: p.grad.clone() for name, p in decoder.named_parameters()}
    decoder.zero_grad(set_to_none=True)
    total = 0
    for row, cols, seq in truth:
        n = cols.stop - cols.start
        states = alone(decoder, seq)
        total = total + (states[-n:] * weights[row, cols]).sum()
    total.backward()
    for name, p in decoder.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(shared[name], p.grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_members_mask_gives_other_attention_the_same_sequences(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids, members, positions, truth = shared_prompt_batch()
    mask = members_mask(members)[0, 0].int()
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # A's last token: prompt and A
    assert mask[6].tolist() == [1, 1, 1, 0, 0, 1, 1, 0]  # B's second token: prompt and B so far, never A
    assert members_mask(members)[1, 0, 5].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # padding: padding
    model.set_attn_implementation("sdpa")
    hidden = decoder_hidden(model.get_decoder(), ids, members, positions)
    check_shared(model.get_decoder(), hidden, truth)
    assert hidden[1, 3:].abs().max() == 0


def read_layouts(pad_id: int) -> dict:
    """Three batches and the columns a reward model reads in them (each sequence's last token):
    padded rows, one packed row of restarting positions, and prefix-shared pairs ([B,2,T] members)."""
    ids, mask, positions = padded(SEQUENCES, [False, True, False, True], pad_id)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    out = {"padded": (ids, mask, positions, (torch.arange(4), last))}
    flat = sum(SEQUENCES, [])
    starts = torch.tensor([0, 7, 10, 15])
    positions = torch.cat([torch.arange(len(s)) for s in SEQUENCES])[None]
    out["packed"] = (torch.tensor([flat]), None, positions, (torch.zeros(4, dtype=torch.long),
                                                            starts + torch.tensor([6, 2, 4, 0])))
    pairs = [TokenizedPair([5, 9, 14, 3], [7, 22, 8], [11, 4], None, 0), TokenizedPair([30, 2], [19], [17, 6, 1], None, 1)]
    batch = collate_pairs(pairs, pad_id, prefix_sharing=True)
    members = batch.attention_mask
    last = members.shape[-1] - 1 - members.flip(-1).int().argmax(-1)  # [B,2]
    out["shared"] = (batch.input_ids, members, batch.position_ids,
                     (torch.arange(2)[:, None].expand_as(last).flatten(), last.flatten()))
    return out


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_states_at_read_tokens_equal_the_whole_pass(decoder, backend, layout):
    # decoder_hidden(at=) computes the last layer at the read tokens only: the states there and
    # every parameter's gradient must be the whole pass's, and the last MLP must see only them.
    ids, mask, positions, at = read_layouts(pad_id=0)[layout]
    seen = []
    hook = decoder.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    weights = torch.randn(len(at[0]), decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = []
    for fast in (True, False):
        decoder.zero_grad(set_to_none=True)
        states = decoder_hidden(decoder, ids, mask, positions, at=at) if fast else \
            decoder_hidden(decoder, ids, mask, positions)[at]
        (states * weights).sum().backward()
        results.append((states.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    hook.remove()
    assert seen[0][:-1] == (len(at[0]),)  # the fast pass's last MLP ran on the read tokens alone
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[1][1].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_other_layer_classes_run_the_whole_last_layer(decoder, monkeypatch):
    ids, mask, positions, at = read_layouts(pad_id=0)["shared"]
    monkeypatch.setattr(attention, "LAST_LAYER_AT", ())
    seen = []
    hook = decoder.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    states = decoder_hidden(decoder, ids, mask, positions, at=at)
    hook.remove()
    assert seen[0][1] > len(at[0])
    torch.testing.assert_close(states, decoder_hidden(decoder, ids, mask, positions)[at])


def test_reading_a_padding_column_is_refused(decoder):
    ids, mask, positions, (rows, last) = read_layouts(pad_id=0)["padded"]
    with pytest.raises(ValueError, match="padding column"):
        decoder_hidden(decoder, ids, mask, positions, at=(rows, torch.full_like(last, mask.shape[1] - 1)))
