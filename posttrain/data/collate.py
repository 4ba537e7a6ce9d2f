"""Batch tokenized examples: right-padded rows, or several examples packed per row.

Packed rows rely on transformers' own packed-sequence support (masking_utils, checked in 5.24): when
a model is called with attention_mask=None, position_ids and no cache, it splits each row
into sequences wherever position_ids does not grow by exactly 1 and makes attention causal
within each sequence only (block-diagonal). So packed batches restart position_ids at 0 for
every example and carry no attention_mask; `Batch.model_inputs()` adds use_cache=False,
without which detection is silently skipped (see the Batch docstring).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.tokenize import TokenizedExample


@dataclass
class Batch:
    """Model inputs and loss mask for B rows of T tokens.

    input_ids: [B, T] long, right-padded with the tokenizer's pad id.
    attention_mask: [B, T] long, 1 on real tokens, for padded batches; None for packed ones.
    position_ids: [B, T] long; restart at 0 for every example packed in a row.
    loss_mask: [B, T] bool; True ⇔ input_ids[b, t] is a prediction target, predicted from
        the logits at t-1. False at position 0 of every row and every packed example, and
        on padding.

    Call the model as `model(**batch.model_inputs())`. For packed batches this matters:
    transformers 5.24 (masking_utils._preprocess_mask_arguments) derives the block-diagonal
    mask from position_ids only when attention_mask is None *and* no cache is passed, but
    LlamaModel.forward creates a DynamicCache whenever use_cache is true, and
    config.use_cache (true by default) fills it in. A plain `model(input_ids,
    position_ids=...)` then attends across packed examples without any warning;
    use_cache=False prevents that.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    loss_mask: torch.Tensor

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers causal LM forward pass on this batch."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "use_cache": False,
        }


def _check(example: TokenizedExample, where: str) -> None:
    if not example.input_ids:
        raise ValueError(f"{where}: empty example")
    if len(example.input_ids) != len(example.loss_mask):
        raise ValueError(f"{where}: {len(example.input_ids)} input_ids but {len(example.loss_mask)} loss_mask entries")
    if example.loss_mask[0]:
        raise ValueError(f"{where}: loss_mask[0] is True, but the first token cannot be predicted")


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest; T = longest example."""
    if not examples:
        raise ValueError("pad_batch: no examples")
    for i, example in enumerate(examples):
        _check(example, f"pad_batch: examples[{i}]")
    width = max(len(e.input_ids) for e in examples)
    batch = _empty(len(examples), width, pad_id)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        batch.input_ids[row, :n] = torch.tensor(example.input_ids)
        batch.loss_mask[row, :n] = torch.tensor(example.loss_mask)
        batch.attention_mask[row, :n] = 1
    batch.position_ids[:] = torch.arange(width)
    return batch


def _empty(rows: int, width: int, pad_id: int) -> Batch:
    return Batch(
        input_ids=torch.full((rows, width), pad_id, dtype=torch.long),
        attention_mask=torch.zeros((rows, width), dtype=torch.long),
        position_ids=torch.zeros((rows, width), dtype=torch.long),
        loss_mask=torch.zeros((rows, width), dtype=torch.bool),
    )


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[list[TokenizedExample]]:
    """Group examples into rows of at most max_length tokens, best-fit decreasing.

    Examples are placed longest first (ties in input order), each into the open row with
    the least room that still fits it, else a new row. Deterministic; rows come in the order
    they were opened. ValueError if an example is longer than max_length.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[TokenizedExample]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"pack_examples: examples[{i}] has {n} tokens, more than max_length={max_length}")
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([examples[i]])
            bisect.insort(room, (max_length - n, len(rows) - 1))
            continue
        free, row = room.pop(at)
        rows[row].append(examples[i])
        bisect.insort(room, (free - n, row))
    return rows


def collate_packed(rows: list[list[TokenizedExample]], pad_id: int, max_length: int) -> Batch:
    """One row per list of examples, concatenated, right-padded to the longest row.

    position_ids restart at 0 for each example, and again for the padding tail, so the
    padding forms its own sequence rather than extending the last example. attention_mask
    is None: see the module and Batch docstrings for how that keeps attention per example.
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed: expected non-empty rows of examples")
    lengths = [sum(len(e.input_ids) for e in row) for row in rows]
    if max(lengths) > max_length:
        raise ValueError(f"collate_packed: a row holds {max(lengths)} tokens, more than max_length={max_length}")
    batch = _empty(len(rows), max(lengths), pad_id)
    for r, row in enumerate(rows):
        start = 0
        for j, example in enumerate(row):
            _check(example, f"collate_packed: rows[{r}][{j}]")
            end = start + len(example.input_ids)
            batch.input_ids[r, start:end] = torch.tensor(example.input_ids)
            batch.loss_mask[r, start:end] = torch.tensor(example.loss_mask)
            batch.position_ids[r, start:end] = torch.arange(end - start)
            start = end
        batch.position_ids[r, start:] = torch.arange(batch.input_ids.shape[1] - start)
    batch.attention_mask = None
    return batch
