"""What sampling produces, as data: `Generation`.

Shapes: B sampled sequences (prompts × n), Q prompt tokens (left-padded), A response tokens
(right-padded), T = Q + A. Every mask is named after what it includes; True counts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from posttrain.data import FINISH_REASONS  # the values of finish_reasons; posttrain.sampling exports it from here
from posttrain.models.shared_prompt import shared_prompt_rows


@dataclass
class Generation:
    """B responses and the prompts they answer; every step after sampling reads this."""

    prompt_ids: torch.Tensor
    """[B, Q] long: prompt tokens with the generation prompt, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """[B, Q] bool: True on real prompt tokens, False on left padding."""
    response_ids: torch.Tensor
    """[B, A] long: sampled tokens, the pad id after each response's stop."""
    response_mask: torch.Tensor
    """[B, A] bool: True from the first sampled token up to and including the stop token
    (the EOS, or the token that completed a stop string); a prefix of each row."""
    sample_logprobs: torch.Tensor
    """[B, A] float32: the sampler's log p(token) at its temperature (before top-p / top-k
    truncation; temperature 1 when greedy), from its own inference weights; 0 off the mask."""
    finish_reasons: list[str]
    """B values of FINISH_REASONS."""
    prompt_index: torch.Tensor
    """[B] long: each response's prompt, as a position in the list of prompts given."""
    sample_index: torch.Tensor
    """[B] long: which of its prompt's n samples each response is (0 … n−1)."""
    prompts: list[str]
    """B texts: the last user turn of each prompt (what a reward function reads)."""
    responses: list[str]
    """B texts: each response decoded up to and including its stop, special tokens removed."""

    @property
    def ended(self) -> torch.Tensor:
        """[B] bool: the response stopped by itself (EOS or stop string), not at max_new_tokens."""
        return torch.tensor([reason != "length" for reason in self.finish_reasons], dtype=torch.bool)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [B, T], attention_mask [B, T] long, position_ids [B, T]) of prompt +
        response, positions counted from each row's first real token."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention = torch.cat([self.prompt_mask, self.response_mask], dim=1).long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention, positions

    def shared_prompt_rows(self) -> "SharedPromptResponses | None":
        """The responses laid out a prompt a row (posttrain.models.shared_prompt): the responses
        to one prompt (equal prompt_index) follow its tokens, each in a causal sequence of its
        own, so the prompt is computed once for all of them. None when no prompt has two
        responses here: there is nothing to share, and `sequences()` is the layout to use."""
        groups: dict[int, list[int]] = {}
        for b, i in enumerate(self.prompt_index.tolist()):
            groups.setdefault(i, []).append(b)
        if len(groups) == len(self.prompts):
            return None
        rows = shared_prompt_rows([(self.prompt_ids[bs[0]][self.prompt_mask[bs[0]]].tolist(),
                                    [self.response_ids[b][self.response_mask[b]].tolist() for b in bs])
                                   for bs in groups.values()], pad_id=0)
        row, start = torch.zeros(len(self.prompts), dtype=torch.long), torch.zeros(len(self.prompts), dtype=torch.long)
        for n, bs in enumerate(groups.values()):
            row[bs], start[bs] = n, torch.tensor(rows.reply_starts[n])
        columns = torch.where(self.response_mask, start[:, None] + torch.arange(self.response_mask.shape[1]), 0)
        targets = torch.zeros(rows.input_ids.shape, dtype=torch.bool)
        targets[row[:, None].expand_as(columns)[self.response_mask], columns[self.response_mask]] = True
        return SharedPromptResponses(rows.input_ids, rows.members, rows.position_ids, targets, row, columns,
                                     self.response_mask)

    def select(self, index: torch.Tensor | slice):
        """The rows at `index`, every tensor and list field alike (a subclass keeps its type)."""
        rows = range(len(self.prompts))[index] if isinstance(index, slice) else index.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in rows]
        return type(self)(**picked)


@dataclass
class SharedPromptResponses:
    """B responses in N rows of a prompt and its responses each (`Generation.shared_prompt_rows`).

    input_ids, position_ids: [N,T] long. members: [N,S,T] bool causal sequences (one a response).
    target_mask: [N,T] bool, True on every response token. row: [B] long, each response's row;
    columns: [B,A] long, the column of each response token (0 off response_mask [B,A] bool).
    """

    input_ids: torch.Tensor
    members: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor
    row: torch.Tensor
    columns: torch.Tensor
    response_mask: torch.Tensor

    def per_response(self, per_token: torch.Tensor) -> torch.Tensor:
        """[N,T] values aligned with input_ids (log-probs of the targets) -> [B,A], each response
        token's value in its response's row, 0 off response_mask."""
        mask = self.response_mask.to(per_token.device)
        return torch.where(mask, per_token[self.row.to(per_token.device)[:, None], self.columns.to(per_token.device)],
                           0.0)
