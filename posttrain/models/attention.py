"""Padding-free decoder passes: a batch's real tokens in one row, attention within each sequence.

A right- or left-padded batch [B,T] spends every matrix product on its padding too: the
benchmark's PPO rollouts (4 prompts of different lengths + responses) laid 244 real tokens
out in 324 columns. `decoder_hidden` drops the padding, runs the decoder once over the N
real tokens as one row [1,N] and puts each hidden state back at its column.

Attention must then stay inside each sequence. transformers would do that from position_ids
restarting at 0 (masking_utils' packed-sequence detection), but with one N×N mask, whose cost
grows with the square of the whole batch: on SmolLM2, 4 rows of 256 packed into one row
trained 1.4× slower than the 4 rows. So the models posttrain loads use ATTENTION, an
attention function registered with transformers: given the sequences' bounds in
`cu_seq_lens_q` (the keyword transformers' flash-attention varlen path reads), it runs torch's
causal SDPA within each sequence; without it, it is transformers' own SDPA, so padded,
4D-masked and cached calls (generation) behave exactly as with attn_implementation="sdpa". A
model loaded with plain "sdpa" still gets correct results from `decoder_hidden` (transformers'
mask keeps sequences apart), only not this speed.

Measured (SmolLM2, bf16 autocast, forward + backward, 2 threads): 4 rollouts of 81, 62, 56 and
45 tokens 0.91 s against 1.08 s padded; 8 reward-model rows of 65–110 tokens 2.34 s against
2.88 s; 4 rows of 80, 80, 78, 74 tokens (2.5 % padding) 1.06 s against 1.07 s (hence MIN_PADDING);
4 sequences of 256 packed in one row (`--packing`) 2.91–3.03 s against 3.71–4.19 s with
transformers' mask.

Shapes: B rows, T columns, N real tokens, H hidden size, h query heads, g key/value heads, d head size.
"""

from __future__ import annotations

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


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [1,h,N,d], key and value [1,g,N,d] ->
    (output [1,N,h,d], None). With `cu_seq_lens_q` ([S+1] long, 0 = c_0 < … < c_S = N: sequence
    s holds tokens c_s … c_{s+1}−1), causal attention within each sequence, and attention_mask
    is ignored. Without it, transformers' SDPA unchanged.

    The S sequences go through one causal SDPA call as S rows right-padded to the longest
    (one call per sequence made the flash backward 30 % slower on 4 rollouts): a query never
    sees the padding after it, and the padding's own outputs are dropped.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"varlen attention: expected one packed row of queries and keys alike, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    lengths = cu_seq_lens_q.diff()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), lengths.to(query.device))
    offset = torch.arange(query.shape[2], device=query.device) - cu_seq_lens_q.to(query.device)[sequence]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [1,heads,N,d] -> [S,heads,L,d], zero after each sequence
        tokens = x[0].transpose(0, 1)
        out = tokens.new_zeros(len(lengths), int(lengths.max()), *tokens.shape[1:])
        out[sequence, offset] = tokens
        return out.transpose(1, 2)

    out = F.scaled_dot_product_attention(rows(query), rows(key), rows(value), dropout_p=dropout, is_causal=True,
                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)[sequence, offset][None], None


AttentionInterface.register(ATTENTION, varlen_sdpa_attention)
# Masks as for "sdpa": padded and 4D-masked calls go to transformers' SDPA with the mask it expects.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B,T] bool: True where a sequence starts, i.e. at column 0 and wherever the
    position does not grow by exactly 1 (transformers' rule for packed rows)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=-1) != 1
    return starts


def _packed_row(decoder: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                starts: torch.Tensor) -> torch.Tensor:
    """Decoder output [1,N,H] for N tokens in one row [1,N], sequences starting where `starts` [N]."""
    bounds = torch.cat([starts.nonzero().flatten(), starts.new_tensor([starts.shape[0]], dtype=torch.long)])
    longest = int(bounds.diff().max())
    # Under ATTENTION an all-ones mask spares transformers building the packed row's N×N mask,
    # which ATTENTION ignores; any other attention needs None, so that transformers' packed-sequence
    # mask keeps the sequences apart.
    ours = decoder.config._attn_implementation == ATTENTION
    mask = torch.ones_like(input_ids)[None] if ours else None
    return decoder(input_ids=input_ids[None], attention_mask=mask, position_ids=position_ids[None], use_cache=False,
                   cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest,
                   max_length_k=longest).last_hidden_state


def decoder_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B,T,H] for input_ids [B,T], as
    `decoder(input_ids, attention_mask, position_ids, use_cache=False)` gives them at every
    real token; 0 at padding.

    attention_mask: [B,T] padding mask (1 = real token; each row's real tokens one sequence,
    left or right padding alike), None for packed rows (sequences split where position_ids
    restart, padding tail included, as transformers splits them), or a [B,1,T,T] mask, which
    goes to the decoder as it is. So does a padded batch with less than MIN_PADDING of padding.
    """
    if attention_mask is not None and (attention_mask.dim() == 4 or
                                       attention_mask.sum() > (1 - MIN_PADDING) * attention_mask.numel()):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    if attention_mask is None:
        starts = sequence_starts(position_ids).flatten()
        packed = _packed_row(decoder, input_ids.flatten(), position_ids.flatten(), starts)
        return packed.view(*input_ids.shape, -1)
    keep = attention_mask.bool()
    # Each row's first real token opens its sequence (left padding puts it after column 0).
    first = keep & ~F.pad(keep, (1, 0))[:, :-1]
    split = (first.sum(-1) > 1).nonzero().flatten().tolist()
    if split:
        raise ValueError(f"decoder_hidden: attention_mask row {split[0]} has padding between real tokens; "
                         "expected left or right padding only")
    packed = _packed_row(decoder, input_ids[keep], position_ids[keep], first[keep])[0]
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
    hidden[keep] = packed
    return hidden


__all__ = ["ATTENTION", "MIN_PADDING", "decoder_hidden", "sequence_starts", "varlen_sdpa_attention"]
