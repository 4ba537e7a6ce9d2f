"""Stage 1 of PPO: sample responses to a batch of prompts, as data.

Shapes: B rollouts, Q prompt tokens (left-padded), A response tokens (right-padded),
T = Q + A, H hidden size. Every mask is named after what it includes; True counts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.data import TokenizedPrompt
from posttrain.ops import first_true_index, response_mask_until_stop


@dataclass
class Generation:
    """What sampling produced (stage 1), before any scoring."""

    query_ids: torch.Tensor
    """[B, Q] long: prompt tokens with the generation prompt, left-padded with the pad id."""
    query_mask: torch.Tensor
    """[B, Q] bool: True on real prompt tokens, False on left padding."""
    response_ids: torch.Tensor
    """[B, A] long: sampled tokens; after the stop, whatever generate padded with."""
    response_mask: torch.Tensor
    """[B, A] bool: True from the first sampled token up to and including the stop token
    (EOS, or the token that completed a stop string); a prefix of each row."""
    ended: torch.Tensor
    """[B] bool: the response stopped by itself (EOS or a stop string), not at max_new_tokens."""
    prompt_index: torch.Tensor
    """[B] long: each prompt's position in the prompt list (its source record's order)."""
    prompts: list[str]
    """B texts: the last user turn of each prompt (what a reward function reads)."""
    responses: list[str]
    """B texts: each response decoded up to its stop, special tokens removed."""

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [B, T], attention_mask [B, T] long, position_ids [B, T]) of prompt +
        response, positions counted from each row's first real token as generate counts them."""
        input_ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        attention = torch.cat([self.query_mask, self.response_mask], dim=1).long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention, positions


@dataclass
class Rollout(Generation):
    """A generation with everything PPO's update needs (stages 2 and 3), fixed for the
    iteration. Log-probs are of the sampled tokens at the sampling temperature."""

    scores: torch.Tensor
    """[B] float32: sequence scores after the missing-EOS penalty, normalisation and clipping."""
    raw_scores: torch.Tensor
    """[B] float32: what the reward model or function returned."""
    logprobs: torch.Tensor
    """[B, A] float32: log π_old(a_t | s_t) of the policy that sampled; 0 off the mask."""
    ref_logprobs: torch.Tensor
    """[B, A] float32: log π_ref(a_t | s_t); 0 off the mask."""
    entropy: torch.Tensor
    """[B, A] float32: entropy of π_old(· | s_t) in nats; 0 off the mask."""
    values: torch.Tensor
    """[B, A] float32: V_old(s_t), the critic's value of the state before token t; 0 off the mask."""

    def select(self, index: torch.Tensor | slice) -> "Rollout":
        """The rollouts at `index` (rows), every tensor and list field alike."""
        rows = range(len(self.prompts))[index] if isinstance(index, slice) else index.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in rows]
        return Rollout(**picked)


def left_pad(prompts: list[TokenizedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, Q] left-padded with pad_id, and their mask [B, Q] bool."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, width - n:] = torch.tensor(prompt.input_ids)
        mask[row, width - n:] = True
    return ids, mask


def stop_string_ends(response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                     stop_strings: list[str]) -> torch.Tensor:
    """[B, A] -> [B] long: index of the token that completes the first stop string, A if none.

    The shortest decoded prefix containing a stop string marks it: decoding token by token
    would split multi-byte characters, and only rows that contain one are searched.
    """
    width = response_ids.shape[1]
    ends = torch.full((response_ids.shape[0],), width, dtype=torch.long)
    for row, ids in enumerate(response_ids.tolist()):
        if not any(s in tokenizer.decode(ids) for s in stop_strings):
            continue
        ends[row] = next(i for i in range(width)
                         if any(s in tokenizer.decode(ids[: i + 1]) for s in stop_strings))
    return ends


def response_masks(response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                   stop_strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(response_mask [B, A] bool, ended [B] bool) for sampled tokens: each response runs to
    its first EOS or stop string, whichever comes first, and includes that token."""
    eos = tokenizer.eos_token_id
    mask = response_mask_until_stop(response_ids, [eos], pad_id=tokenizer.pad_token_id)
    ended = first_true_index(response_ids == eos) < response_ids.shape[1]
    if stop_strings:
        ends = stop_string_ends(response_ids, tokenizer, stop_strings)
        mask &= torch.arange(response_ids.shape[1]) <= ends.unsqueeze(-1)
        ended |= ends < response_ids.shape[1]
    return mask, ended


def sampling_config(tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, temperature: float,
                    top_p: float, stop_strings: list[str]) -> GenerationConfig:
    """Plain ancestral sampling with a KV cache: no top-k, no repetition penalty, whatever
    the model's own generation_config.json asks for (it would change the distribution the
    PPO ratio assumes)."""
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True,
                            stop_strings=stop_strings or None)


@torch.no_grad()
def generate_rollouts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      prompts: list[TokenizedPrompt], indices: list[int], *,
                      generation: GenerationConfig) -> Generation:
    """Sample one response to each of prompts[i] for i in `indices` (stage 1).

    The caller sets autocast and eval mode. Sampling uses the global torch RNG, so a seeded
    (or checkpoint-restored) RNG reproduces the same responses.
    """
    batch = [prompts[i] for i in indices]
    query_ids, query_mask = left_pad(batch, tokenizer.pad_token_id)
    device = model.device
    # generate needs the tokenizer only to match stop strings.
    out = model.generate(input_ids=query_ids.to(device), attention_mask=query_mask.long().to(device),
                         generation_config=generation, tokenizer=tokenizer)
    response_ids = out[:, query_ids.shape[1]:].cpu()
    response_mask, ended = response_masks(response_ids, tokenizer, generation.stop_strings or [])
    responses = [tokenizer.decode(ids[mask], skip_special_tokens=True)
                 for ids, mask in zip(response_ids, response_mask)]
    return Generation(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                      response_mask=response_mask, ended=ended, prompt_index=torch.tensor(indices),
                      prompts=[p.messages[-1]["content"] for p in batch], responses=responses)
