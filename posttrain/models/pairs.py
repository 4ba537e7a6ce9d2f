"""Preference pairs as model inputs, and the log-probabilities of their two replies.

A batch of B pairs has one of two layouts (shape letters: B pairs, N rows, T tokens):

* plain (N = 2B): prompt+chosen of every pair, then prompt+rejected, right-padded, with the
  usual [N,T] padding mask. The prompt is computed twice.
* prefix-shared (N = B): one row per pair, prompt ++ chosen ++ p ++ rejected, where p is a
  second copy of the prompt's last token, with a [N,2,T] bool mask of the row's two causal
  sequences (posttrain.models.shared_prompt draws the layout and says why p is there):
  chosen tokens see prompt + chosen, rejected tokens see the prompt and rejected, never chosen,
  and positions continue from the prompt in both replies. posttrain's attention
  (posttrain.models.attention) runs the two sequences over one packed row of the real tokens,
  the prompt's projections and MLPs computed once; any other attention gets the equivalent
  [N,1,T,T] mask.

Either way the LM head runs only on chosen and rejected reply tokens (TokenLogprobs), and
chosen and rejected go through the model in one forward pass. The reward model scores pairs
in the same layouts, reading each reply's reward at its last token
(posttrain.trainers.reward.pair_rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data import TokenizedPair, pad_batch
from posttrain.models.shared_prompt import shared_prompt_rows
from posttrain.ops import masked_sum


@dataclass
class PairBatch:
    """Model inputs for B preference pairs laid out in N rows (N = B or 2B) of T tokens.

    input_ids: [N,T] long. attention_mask: [N,T] long padding mask (plain layout) or [N,2,T]
    bool, True where column t is in the row's sequence 0 (prompt + chosen) or 1 (prompt
    without its last token + p + rejected) (prefix-shared).
    position_ids: [N,T] long. chosen_mask / rejected_mask: [N,T] bool, True on the chosen /
    rejected reply tokens, each a prediction target. chosen_lengths / rejected_lengths: [B]
    float, reply token counts. ref_logps: [B,2] summed reference log-probs (chosen,
    rejected) when precomputed, else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        return self.chosen_lengths.shape[0]


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, *, prefix_sharing: bool,
                  ref_logps: torch.Tensor | None = None) -> PairBatch:
    """Lay B pairs out as a PairBatch; ref_logps [B,2] is carried along when given."""
    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    for i, pair in enumerate(pairs):
        if not (pair.prompt_ids and pair.chosen_ids and pair.rejected_ids):
            raise ValueError(f"collate_pairs: pairs[{i}] (record {pair.source_index}) has an empty "
                             "prompt, chosen or rejected reply")
    lengths = [torch.tensor([float(len(getattr(p, f))) for p in pairs]) for f in ("chosen_ids", "rejected_ids")]
    layout = _shared if prefix_sharing else _plain
    return PairBatch(*layout(pairs, pad_id), *lengths, ref_logps=ref_logps)


def _plain(pairs: list[TokenizedPair], pad_id: int):
    rows = [pair.examples()[0] for pair in pairs] + [pair.examples()[1] for pair in pairs]
    batch = pad_batch(rows, pad_id)
    first_half = torch.arange(len(rows))[:, None] < len(pairs)
    return (batch.input_ids, batch.attention_mask, batch.position_ids,
            batch.loss_mask & first_half, batch.loss_mask & ~first_half)


def _shared(pairs: list[TokenizedPair], pad_id: int):
    rows = shared_prompt_rows([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], pad_id)
    chosen_mask = torch.zeros(rows.input_ids.shape, dtype=torch.bool)
    rejected_mask = torch.zeros(rows.input_ids.shape, dtype=torch.bool)
    for row, (p, (chosen, rejected)) in enumerate(zip(pairs, rows.reply_starts)):
        chosen_mask[row, chosen: chosen + len(p.chosen_ids)] = True
        # The copy p opens the rejected sequence but is not a target: it follows the chosen reply.
        rejected_mask[row, rejected: rejected + len(p.rejected_ids)] = True
    return rows.input_ids, rows.members, rows.position_ids, chosen_mask, rejected_mask


def sequence_logps(model: torch.nn.Module, batch: PairBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π of each pair's chosen and rejected reply, ([B], [B]) float32.

    `model` is a TokenLogprobs (or a wrapper of one): one forward pass over all N rows.
    """
    chosen_mask, rejected_mask = batch.chosen_mask.to(device), batch.rejected_mask.to(device)
    per_token = model(batch.input_ids.to(device), batch.attention_mask.to(device),
                      batch.position_ids.to(device), chosen_mask | rejected_mask)
    # Row sums [N] folded to pairs [B]: in the plain layout each pair's reply sits in one of
    # its two rows and the other contributes 0.
    fold = (lambda rows: rows.view(-1, batch.pairs).sum(0))
    return fold(masked_sum(per_token, chosen_mask, -1)), fold(masked_sum(per_token, rejected_mask, -1))
