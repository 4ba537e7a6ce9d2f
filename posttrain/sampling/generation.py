"""What sampling produces, as data: `Generation`.

Shapes: B sampled sequences (prompts × n), Q prompt tokens (left-padded), A response tokens
(right-padded), T = Q + A. Every mask is named after what it includes; True counts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from posttrain.data import FINISH_REASONS  # the values of finish_reasons; posttrain.sampling exports it from here


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

    def select(self, index: torch.Tensor | slice):
        """The rows at `index`, every tensor and list field alike (a subclass keeps its type)."""
        rows = range(len(self.prompts))[index] if isinstance(index, slice) else index.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in rows]
        return type(self)(**picked)
