"""Padding-free decoder passes: a batch's real tokens in one row, attention within each sequence.

A right- or left-padded batch [B,T] spends every matrix product on its padding too: the
benchmark's PPO rollouts (4 prompts of different lengths + responses) laid 244 real tokens
out in 324 columns. `decoder_hidden` drops the padding, runs the decoder once over the N
real tokens as one row [1,N] and puts each hidden state back at its column.

Attention must then stay inside each sequence. transformers would do that from position_ids
restarting at 0 (masking_utils' packed-sequence detection), but with one N×N mask, whose cost
grows with the square of the whole batch: on SmolLM2, 4 rows of 256 packed into one row
trained 1.4× slower than the 4 rows. So the models posttrain loads use ATTENTION, an
attention function registered with transformers: given a `causal_sequences` keyword
(CausalSequences, which transformers passes down to every layer's attention), it lays the
packed tokens out again as rows and attends once over them (`eager_attention` for short rows,
torch's SDPA for long ones), causal within each sequence; without it, it is transformers' own SDPA, so padded, 4D-masked and cached calls
(generation) behave exactly as with attn_implementation="sdpa". A model loaded with plain
"sdpa" still gets correct results from `decoder_hidden` (transformers' mask keeps sequences
apart), only not this speed.

Sequences may share columns (a DPO prompt with its two replies, posttrain.models.pairs): the
shared columns then go through the projections and MLPs once, and attention runs over the
batch's own rows under the mask the sequences define, so only the padding is dropped.

Measured (SmolLM2, bf16 autocast, forward + backward, 2 threads): 4 rollouts of 81, 62, 56 and
45 tokens 0.91 s against 1.08 s padded; 8 reward-model rows of 65–110 tokens 2.34 s against
2.88 s; 4 rows of 80, 80, 78, 74 tokens (2.5 % padding) 1.06 s against 1.07 s (hence MIN_PADDING);
4 sequences of 256 packed in one row (`--packing`) 2.91–3.03 s against 3.71–4.19 s with
transformers' mask; the benchmark's 9 DPO batches of 4 prefix-shared pairs (10–28 % padding),
policy forward + backward and a no-grad forward, 0.89× the time with the padded [N,1,T,T] mask
(every batch faster; 0.93× when attention ran over each sequence right-padded instead).

Shapes: B rows, T columns, N real tokens, H hidden size, h query heads, g key/value heads, d head size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "posttrain_sdpa"
"""The attn_implementation name posttrain loads models with."""

MIN_PADDING = 0.125
"""Share of a padded batch's columns that must be padding for `decoder_hidden` to pack it. Packing
costs copies of the hidden states and of q/k/v at every layer: measured on SmolLM2 (forward +
backward), 2.5 % padding ran 0.98–1.07× the padded time, 12 % ran 0.88–0.93×, 24 % 0.81–0.88×;
GRPO's rollouts (little padding) ran slower and peaked 0.34 GB higher when every batch was packed."""

EAGER_MAX_LENGTH = 192
"""Longest row for which `decoder_hidden`'s passes attend through `eager_attention` instead of
SDPA's flash kernel. At SmolLM2's shapes (9 query heads over 3 key/value heads of 64, bf16,
forward + backward, 2 threads) eager attention took 0.2–0.4× flash's time for 8 rows × 64–110
and 0.5× at 8 × 192, 0.75× at 4 × 256–320 and 1.0× at 4 × 384. It keeps the probabilities for the
backward (fp32 and bf16: 6.9 MB a layer at 8 × 110 against flash's 2.7 MB), so it stops at 192
tokens, below the 4 × 256 SFT rows where it would add 0.4 GB for a 0.12 s step gain. SDPA's math
backend, used here before, took 2–2.5× eager's time and kept 13.1 MB at 8 × 110: it computes in
fp32 and copies the key/value heads to every query head."""


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + mask)·v by two matrix products, computed as transformers' eager
    attention computes it (products in the inputs' dtype, the softmax in fp32, probabilities cast
    back, dropout on them), but without copying the key/value heads: the query heads that share a
    key/value head are stacked along the rows of one product.

    query [B,h,Q,d], key and value [B,g,L,d] (h a multiple of g; query head i reads key/value head
    i // (h/g), as SDPA's enable_gqa) -> [B,h,Q,d]. mask: None (causal; Q = L), or [B or 1,1,Q,L],
    bool (True: the query may attend to the key) or float (added to the scores). A query row that
    may attend to no key gets finite output (fp32's lowest value stands in for −inf), which the
    caller drops; SDPA would give NaN there.
    """
    B, h, Q, d = query.shape
    g, L = key.shape[1], key.shape[2]
    scores = torch.matmul(query.reshape(B, g, h // g * Q, d), key.transpose(-1, -2)).view(B, g, h // g, Q, L)
    if mask is None:
        mask = torch.ones(Q, L, dtype=torch.bool, device=query.device).tril()
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=query.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    else:
        bias = mask.float()
    if bias.dim() == 4:
        bias = bias[:, :, None]  # [B,1,1,Q,L]: the same for every head
    probs = torch.softmax(torch.add(bias, scores.float(), alpha=scaling), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs.view(B, g, h // g * Q, L), value).view(B, h, Q, d)


@dataclass(frozen=True)
class CausalSequences:
    """How the tokens of a packed row [1,N] are laid out again as rows for attention, in
    `varlen_sdpa_attention`.

    index: [R,L] long, the packed token at column l of row r (token 0 where a row has none:
    no real query sees it and its outputs are dropped). output: [N] long, the flat position
    r·L + l of each packed token. mask: None (causal attention within each row) or [R,1,L,L]
    bool (True: the query may attend to the key).
    """

    index: torch.Tensor
    output: torch.Tensor
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, members: torch.Tensor) -> "CausalSequences":
        """members [B,S,T] bool (True: column t is in causal sequence s of row b) -> the layout
        for the packed row of every column in some sequence, in row-major order
        (`members.any(1)`). Sequences that share no column become one causal row each,
        right-padded to the longest; with shared columns, the batch keeps its own rows under
        `members_mask`, so the shared columns are computed once."""
        B, S, T = members.shape
        real = members.any(1)
        packed = real.flatten().cumsum(0).view(B, T) - 1  # each real column's place in the packed row
        if (members.sum(1) > 1).any():
            return cls(torch.where(real, packed, 0), real.flatten().nonzero().flatten(), members_mask(members))
        flat = members.flatten(0, 1)
        used = flat.any(-1)
        row, flat = torch.arange(B).repeat_interleave(S)[used], flat[used]
        longest = int(flat.sum(-1).max())
        # A stable sort puts each sequence's columns first, in order; T marks past its end.
        columns = torch.where(flat, torch.arange(T), T).sort(dim=-1, stable=True).values[:, :longest]
        index = torch.where(columns < T, packed[row[:, None], columns.clamp(max=T - 1)], 0)
        offset = torch.arange(longest).expand_as(index)
        return cls(index, (torch.arange(len(flat))[:, None] * longest + offset)[columns < T])


class _Rows(torch.autograd.Function):
    """x [N,...] -> x[index] [R,L,...], with the gradient read back rather than scattered.

    Every packed token sits at exactly one place of the rows (`output`); the others repeat token
    0 and hold padding, whose outputs the caller drops, so no gradient reaches them (a padding
    query's output is dropped; a padding key is seen by padding queries only, as laid out in
    `CausalSequences`). The gradient of each token is therefore the one at its own place: a
    gather, where autograd's rule for indexing scatters with accumulation into [N,...]
    (index_put_: 0.045 s of a SmolLM2 reward-model step under torch.profiler, 2 threads). Paired
    in one process, a forward + backward over 4 prefix-shared pairs (605 tokens) took 0.034 s
    less with both functions, and a DPO step on the benchmark's pairs 0.011–0.013 s less."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(output)
        return x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (output,) = ctx.saved_tensors
        return grad.flatten(0, 1)[output], None, None


class _Packed(torch.autograd.Function):
    """rows [R,L,...] -> [N,...], the packed tokens at their places (`output`); the inverse of
    `_Rows`. The backward gathers the gradient back into rows, zero at the padding places."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, output)
        length = index.shape[1]
        return x[output // length, output % length]  # no copy of a strided x into one [R·L,...] first

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        index, output = ctx.saved_tensors
        rows = grad.new_zeros(index.numel(), *grad.shape[1:]).index_copy_(0, output, grad)
        return rows.view(*index.shape, *grad.shape[1:]), None, None


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          causal_sequences: CausalSequences | None = None, short_rows_eager: bool = False,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [1,h,N,d], key and value [1,g,N,d] ->
    (output [1,N,h,d], None). With `causal_sequences`, the packed tokens go through one attention
    call laid out as its rows (one call per sequence made the flash backward 30 % slower on 4
    rollouts), and attention_mask is ignored. Without it, transformers' SDPA unchanged (query
    [B,h,T,d]), except that with `short_rows_eager` (decoder_hidden's passes, never generation) rows
    of at most EAGER_MAX_LENGTH tokens go through `eager_attention`, as packed rows of that length do.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if causal_sequences is None:
        if (short_rows_eager and query.shape[2] == key.shape[2] <= EAGER_MAX_LENGTH
                and kwargs.get("position_bias") is None and kwargs.get("softcap") is None):
            out = eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"varlen attention: expected one packed row of queries and keys alike, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    index, output = causal_sequences.index.to(query.device), causal_sequences.output.to(query.device)
    mask = causal_sequences.mask
    mask = None if mask is None else mask.to(query.device)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [1,heads,N,d] -> [R,heads,L,d]
        return _Rows.apply(x[0].transpose(0, 1), index, output).transpose(1, 2)

    if index.shape[1] <= EAGER_MAX_LENGTH:
        out = eager_attention(rows(query), rows(key), rows(value), mask, scaling, dropout, module.training)
    else:
        out = F.scaled_dot_product_attention(rows(query), rows(key), rows(value), dropout_p=dropout, attn_mask=mask,
                                             is_causal=mask is None, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return _Packed.apply(out.transpose(1, 2), index, output)[None], None


AttentionInterface.register(ATTENTION, varlen_sdpa_attention)
# Masks as for "sdpa": padded and 4D-masked calls go to transformers' SDPA with the mask it expects.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B,T] bool: True where a sequence starts, i.e. at column 0 and wherever the
    position does not grow by exactly 1 (transformers' rule for packed rows)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=-1) != 1
    return starts


def sequence_members(attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
    """The causal sequences of a batch as members [B,S,T] bool (True: column t is in sequence s
    of row b): from a [B,T] padding mask (one sequence a row; refused with padding between real
    tokens), from position restarts for packed rows (mask None, sequence_starts), or a
    [B,S,T] bool mask as it is."""
    if attention_mask is None:
        segment = sequence_starts(position_ids).cumsum(-1) - 1
        return segment[:, None, :] == torch.arange(int(segment.max()) + 1)[None, :, None]
    if attention_mask.dim() == 3:
        return attention_mask.bool()
    keep = attention_mask.bool()
    # Each row's first real token opens its sequence (left padding puts it after column 0).
    first = keep & ~F.pad(keep, (1, 0))[:, :-1]
    split = (first.sum(-1) > 1).nonzero().flatten().tolist()
    if split:
        raise ValueError(f"decoder_hidden: attention_mask row {split[0]} has padding between real tokens; "
                         "expected left or right padding only")
    return keep[:, None, :]


def members_mask(members: torch.Tensor) -> torch.Tensor:
    """members [B,S,T] bool -> the same attention as a [B,1,T,T] bool mask (query t, key k): t
    attends to k ≤ t of the first sequence holding t. A column in no sequence (padding) attends
    to earlier padding only, so no query row is empty (an all-False row gives NaN in SDPA) and
    no real token sees padding."""
    B, _, T = members.shape
    real = members.any(1)
    first = members.int().argmax(1)
    own = members.gather(1, first[:, :, None].expand(B, T, T))  # own[b,t,k] = members[b, first[b,t], k]
    allowed = torch.where(real[:, :, None], own, ~real[:, None, :])
    return (allowed & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)


LAST_LAYER_AT = ("LlamaDecoderLayer",)
"""Decoder-layer classes whose last layer `decoder_hidden(..., at=)` computes at the read tokens
only (`_last_layer_at` follows their forward: pre-norm attention with rotary positions and
grouped key/value heads, then a pre-norm MLP, each added to the residual). Others run whole."""


def _hidden_at(decoder: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
               sequences: CausalSequences, take: torch.Tensor) -> torch.Tensor:
    """The packed row input_ids [1,N] through every layer but the last, as the decoder's forward
    runs them (embedding, rotary tables, layers under ATTENTION with `sequences`), then
    `_last_layer_at` at the packed tokens `take` [K] -> [K,H]."""
    hidden = decoder.embed_tokens(input_ids)
    cos_sin = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[: decoder.config.num_hidden_layers - 1]:
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin,
                       causal_sequences=sequences)
    last = decoder.layers[-1]
    if getattr(last, "gradient_checkpointing", False) and last.training and torch.is_grad_enabled():
        # Checkpointed as the layer itself would be (transformers' GradientCheckpointingLayer).
        return last._gradient_checkpointing_func(_last_layer_at, decoder, hidden, cos_sin, sequences, take)
    return _last_layer_at(decoder, hidden, cos_sin, sequences, take)


def _last_layer_at(decoder: torch.nn.Module, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                   sequences: CausalSequences, take: torch.Tensor) -> torch.Tensor:
    """The decoder's last layer and final norm, computed for the packed tokens `take` [K] only:
    their queries, attention over their own sequence's keys, output projection and MLP; keys and
    values for every token, which those queries read. hidden [1,N,H] is the input of the last
    layer, cos_sin the rotary tables [1,N,d]. -> [K,H], what the whole pass gives at `take`.

    For a Llama-style layer (LAST_LAYER_AT): a reward model reads one token of each sequence, so
    the rest of the last layer (1/30 of SmolLM2's layers) is work thrown away; skipping it took
    0.037–0.039 s off an RM step on the benchmark's prefix-shared pairs (paired, 2 threads)."""
    layer = decoder.layers[-1]
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    d, N, K = attn.head_dim, hidden.shape[1], take.shape[0]
    cos, sin = cos_sin
    x = layer.input_layernorm(hidden)
    key = attn.k_proj(x).view(1, N, -1, d).transpose(1, 2)  # [1,g,N,d]
    value = attn.v_proj(x).view(1, N, -1, d).transpose(1, 2)
    query = attn.q_proj(x[:, take]).view(1, K, -1, d).transpose(1, 2)  # [1,h,K,d]
    key = rope(key, key, cos, sin)[1]
    query = rope(query, query, cos[:, take], sin[:, take])[0]
    h = query.shape[1]
    # Each taken token's row r and column l in the rows layout; its keys are that row's tokens.
    index, length = sequences.index.to(take.device), sequences.index.shape[1]
    place = sequences.output.to(take.device)[take]
    row, column = place // length, place % length
    keys = index[row]  # [K,L]
    if sequences.mask is None:
        allowed = torch.arange(length, device=take.device)[None, :] <= column[:, None]
    else:
        allowed = sequences.mask.to(take.device)[row, 0, column]  # [K,L]
    k_rows = key[0][:, keys].transpose(0, 1)  # [K,g,L,d]
    v_rows = value[0][:, keys].transpose(0, 1)
    # Each taken token is a one-query row of its own: [K,h,1,d] against its row's keys.
    out = eager_attention(query[0].transpose(0, 1)[:, :, None], k_rows, v_rows, allowed[:, None, None], attn.scaling)
    out = attn.o_proj(out.reshape(K, h * d))
    hidden = hidden[0, take] + out
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return decoder.norm(hidden)


def decoder_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor, *, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The decoder's last hidden states [B,T,H] for input_ids [B,T], as
    `decoder(input_ids, attention_mask, position_ids, use_cache=False)` gives them at every
    real token; 0 at padding.

    attention_mask: [B,T] padding mask (1 = real token; each row's real tokens one sequence,
    left or right padding alike), None for packed rows (sequences split where position_ids
    restart, padding tail included, as transformers splits them), [B,S,T] bool sequence
    members (S causal sequences a row, which may share columns: a column's state is the one
    it has in the first sequence holding it, see CausalSequences; a column in none is
    padding), or a [B,1,T,T] mask, which goes to the decoder as it is. So does a padded
    batch with less than MIN_PADDING of padding. Under ATTENTION, rows of at most EAGER_MAX_LENGTH
    tokens attend through `eager_attention`.

    at: (rows [K], columns [K]) long, real columns: only the states there, [K,H]. Under ATTENTION a
    packed pass of a LAST_LAYER_AT model then computes its last layer at those tokens only (a
    reward model's read tokens); ValueError if one is padding.
    """
    ours = decoder.config._attn_implementation == ATTENTION
    if attention_mask is not None and (attention_mask.dim() == 4 or (
            attention_mask.dim() == 2 and attention_mask.sum() > (1 - MIN_PADDING) * attention_mask.numel())):
        extra = {"short_rows_eager": True} if ours else {}
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **extra).last_hidden_state
        return hidden if at is None else hidden[at]
    members = sequence_members(attention_mask, position_ids)
    real = members.any(1)
    if at is not None and not real[at].all():
        raise ValueError("decoder_hidden: `at` names a padding column")
    if ours:
        sequences = CausalSequences.of(members)
        layers = getattr(decoder, "layers", None)
        if (at is not None and layers is not None and type(layers[-1]).__name__ in LAST_LAYER_AT
                and (decoder.config.attention_dropout == 0 or not decoder.training)):
            take = (real.flatten().cumsum(0).view(real.shape) - 1)[at]  # each read column's packed place
            return _hidden_at(decoder, input_ids[real][None], position_ids[real][None], sequences, take)
        # An all-ones mask spares transformers building the packed row's N×N mask, which
        # ATTENTION ignores when given the sequences.
        extra = {"attention_mask": torch.ones_like(input_ids[real])[None], "causal_sequences": sequences}
    elif members.shape[1] > 1 and attention_mask is not None:
        # Shared columns need a mask of their own under any other attention.
        hidden = decoder(input_ids=input_ids, attention_mask=members_mask(members), position_ids=position_ids,
                         use_cache=False).last_hidden_state * real[..., None]
        return hidden if at is None else hidden[at]
    else:
        # transformers' packed-sequence mask keeps the sequences apart (positions restart at each).
        extra = {"attention_mask": None}
    packed = decoder(input_ids=input_ids[real][None], position_ids=position_ids[real][None], use_cache=False,
                     **extra).last_hidden_state[0]
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
    hidden[real] = packed
    return hidden if at is None else hidden[at]


__all__ = ["ATTENTION", "EAGER_MAX_LENGTH", "LAST_LAYER_AT", "MIN_PADDING", "CausalSequences", "decoder_hidden", "eager_attention",
           "members_mask", "sequence_members", "sequence_starts", "varlen_sdpa_attention"]
