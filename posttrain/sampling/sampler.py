"""The one sampler: prompts × n → a `Generation`.

Every caller that needs responses — `posttrain generate` and `sample`, PPO's rollouts, data
building, evaluation — goes through `Sampler.generate`. Shapes: B sampled sequences, Q prompt
tokens (left-padded), A response tokens, V vocabulary.

Reproducibility: each sequence draws its tokens from its own random stream, seeded by
(seed, the prompt's source index, the sample's index), by inverse-CDF sampling with one uniform
number per step. A prompt's samples therefore do not depend on the batch it landed in or on the
batch size (up to float rounding of the logits, exact in fp32 on the CPU), so an interrupted
`posttrain sample` continues with the very samples it would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.models.logprobs import base_causal_lm
from posttrain.models.precision import resolve_precision
from posttrain.sampling.decoders import make_decoder
from posttrain.sampling.generation import Generation


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: every default runnable."""

    n: int = 1
    """Responses per prompt."""
    max_new_tokens: int = 128
    """Response tokens at most; a response cut here finishes with reason "length"."""
    temperature: float = 1.0
    """Softmax temperature τ (logits / τ); 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass (1: all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    stop_strings: tuple[str, ...] = ()
    """Also end a response at the token completing any of these strings (EOS always ends it)."""
    seed: int = 0
    """Base seed; with a prompt's source index and the sample index it seeds each sequence."""

    def validate(self) -> None:
        """ValueError naming the first parameter no run could use."""
        checks = (("n", self.n >= 1, "must be ≥ 1"), ("max_new_tokens", self.max_new_tokens >= 1, "must be ≥ 1"),
                  ("temperature", 0 <= self.temperature < math.inf, "must be finite and ≥ 0"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"), ("top_k", self.top_k >= 0, "must be ≥ 0"),
                  ("stop_strings", all(self.stop_strings), "must not contain an empty string"))
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"sampling: {name}={getattr(self, name)!r} {why}")


def sequence_seed(seed: int, prompt_key: int, sample: int) -> int:
    """A 63-bit seed for one sequence from (base seed, prompt source index, sample index)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + prompt_key * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB)
    return mixed % (2 ** 63)


def uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[B, A] float64 uniforms in [0, 1): row b is the stream of generator seeds[b]."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds])


TOP_P_CANDIDATES = 256
"""Tokens `nucleus` ranks first by a partial sort (topk): 1.5 ms for 16 rows of SmolLM2's 49k
tokens here, against 29 ms to sort them whole."""


def nucleus(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """probs [B, V] ≥ 0 (unnormalised) with the tokens outside the top-p nucleus set to 0: in
    descending order, a token stays while the mass of the ones before it is under threshold [B, 1]
    (top_p · the row's mass), so the most likely always stays (Holtzman et al. 2020, §3.1).

    The TOP_P_CANDIDATES most likely tokens are ranked first; a row whose nucleus may reach past
    them (their mass under its threshold) is sorted whole. Either way the kept tokens and their
    probabilities are those of a full sort.
    """
    values, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    wide = values.cumsum(-1)[:, -1] < threshold[:, 0]

    def keep(values: torch.Tensor, order: torch.Tensor, threshold: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        before = values.cumsum(-1) - values
        return torch.zeros_like(like).scatter(-1, order, torch.where(before < threshold, values, 0.0))

    if not wide.any():
        return keep(values, order, threshold, probs)
    out = torch.empty_like(probs)
    narrow = ~wide
    out[narrow] = keep(values[narrow], order[narrow], threshold[narrow], probs[narrow])
    out[wide] = keep(*probs[wide].sort(dim=-1, descending=True), threshold[wide], probs[wide])
    return out


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] long, log-probs [B] float32) for logits [B, V] float32 and uniforms u [B].

    The log-prob is log softmax(logits / τ) of the chosen token, before top-k / top-p (the
    distribution PPO's ratio and a teacher-forced forward at τ compute); τ = 1 when greedy.
    Sampling inverts the CDF of the truncated, renormalised distribution at u.
    """
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, (logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1))
    scaled = logits / params.temperature if params.temperature != 1 else logits
    # Unnormalised: the CDF's last entry is the mass it is inverted against, so the only pass
    # normalising needs is a sum for the log-prob (logsumexp would exponentiate twice).
    peak = scaled.amax(-1, keepdim=True)
    probs = (scaled - peak).exp_()
    mass = probs.sum(-1, keepdim=True)
    normalizer = peak + mass.log()
    if params.top_k:
        kth = probs.topk(min(params.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1:
        probs = nucleus(probs, params.top_p * mass)
    cdf = probs.cumsum_(-1)
    target = (u * cdf[:, -1].double()).float()[:, None]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return tokens, (scaled.gather(-1, tokens[:, None]) - normalizer).squeeze(-1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, Q] left-padded with pad_id, and their mask [B, Q] bool."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = True
    return ids, mask


class Sampler:
    """Samples responses from `model` (an HF causal LM, optionally peft-wrapped).

    precision: "auto" | "bf16" | "fp32" — the dtype of the inference weights and cache.
    batch_size: sequences decoded together. backend: "auto" | "llama" | "hf" (see decoders.py).
    Call `sync()` after the model's weights change (an optimizer step): the fast backend
    samples from its own copy of them.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, precision: str = "auto",
                 batch_size: int = 8, backend: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"sampler: batch_size={batch_size} must be ≥ 1")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: sampling needs an EOS and a pad token")
        device = next(model.parameters()).device.type
        dtype = torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.max_positions = getattr(base_causal_lm(model).config, "max_position_embeddings", None)
        self.decoder = make_decoder(model, dtype, backend, batch_size)

    def sync(self) -> None:
        """Refresh the inference weights from the model (after its weights changed)."""
        self.decoder.sync()

    def generate(self, prompts: list[TokenizedPrompt], params: SamplingParams) -> Generation:
        """params.n responses to every prompt, in prompt order (prompt i's samples are rows
        i·n … i·n + n − 1); prompt_index counts positions in `prompts`."""
        params.validate()
        if not prompts:
            raise ValueError("sampler: no prompts to sample from")
        longest = max(prompts, key=lambda p: len(p.input_ids))
        if self.max_positions is not None and len(longest.input_ids) + params.max_new_tokens > self.max_positions:
            raise ValueError(f"sampler: prompt {longest.source_index + 1} has {len(longest.input_ids)} tokens; with "
                             f"max_new_tokens={params.max_new_tokens} that passes the model's "
                             f"{self.max_positions} positions")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        parts = [self._generate_batch(prompts, rows[start: start + self.batch_size], params)
                 for start in range(0, len(rows), self.batch_size)]
        return concat(parts, self.tokenizer.pad_token_id)

    def _generate_batch(self, prompts: list[TokenizedPrompt], rows: list[tuple[int, int]],
                        params: SamplingParams) -> Generation:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        # Each distinct prompt is computed once; its n samples then share its cache rows.
        distinct = sorted({i for i, _ in rows})
        unique_ids, unique_mask = left_pad([prompts[i].input_ids for i in distinct], pad)
        repeat = torch.tensor([distinct.index(i) for i, _ in rows])
        prompt_ids, prompt_mask = unique_ids[repeat], unique_mask[repeat]
        batch, width, steps = len(rows), prompt_ids.shape[1], params.max_new_tokens
        u = uniforms([sequence_seed(params.seed, prompts[i].source_index, j) for i, j in rows], steps)
        self.decoder.start(len(distinct), width + steps)
        unique_keys = torch.zeros((len(distinct), width + steps), dtype=torch.bool)
        unique_keys[:, :width] = unique_mask
        logits = self.decoder.forward(unique_ids, (unique_mask.cumsum(-1) - 1).clamp(min=0), 0, unique_keys)[repeat]
        self.decoder.select_rows(repeat)
        key_mask = unique_keys[repeat]
        next_position = prompt_mask.sum(-1, keepdim=True)                     # [B, 1]
        response_ids = torch.full((batch, steps), pad, dtype=torch.long)
        logprobs = torch.zeros((batch, steps))
        finished = torch.zeros(batch, dtype=torch.bool)
        reasons = ["length"] * batch
        for t in range(steps):
            tokens, token_logprobs = choose_tokens(logits, u[:, t], params)
            live = ~finished
            response_ids[live, t] = tokens[live]
            logprobs[live, t] = token_logprobs[live]
            key_mask[:, width + t] = live
            for row in torch.nonzero(live & (tokens == eos)).flatten().tolist():
                reasons[row] = "eos"
            if params.stop_strings:
                for row in torch.nonzero(live & (tokens != eos)).flatten().tolist():
                    text = self.tokenizer.decode(response_ids[row, : t + 1])
                    if any(s in text for s in params.stop_strings):
                        reasons[row] = "stop"
            finished = torch.tensor([r != "length" for r in reasons])
            if finished.all() or t == steps - 1:
                break
            logits = self.decoder.forward(tokens[:, None], next_position, width + t, key_mask)
            next_position = next_position + 1
        used = t + 1
        response_ids, logprobs = response_ids[:, :used], logprobs[:, :used]
        response_mask = key_mask[:, width: width + used].clone()
        return Generation(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
            sample_logprobs=logprobs, finish_reasons=reasons,
            prompt_index=torch.tensor([i for i, _ in rows]), sample_index=torch.tensor([j for _, j in rows]),
            prompts=[prompts[i].messages[-1]["content"] for i, _ in rows],
            responses=[self.tokenizer.decode(ids[mask], skip_special_tokens=True)
                       for ids, mask in zip(response_ids, response_mask)])


def concat(parts: list[Generation], pad_id: int) -> Generation:
    """One Generation of several, prompts re-padded on the left and responses on the right."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.prompt_ids.shape[1] for p in parts)
    steps = max(p.response_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    return Generation(
        prompt_ids=torch.cat([pad(p.prompt_ids, width - p.prompt_ids.shape[1], 0, pad_id) for p in parts]),
        prompt_mask=torch.cat([pad(p.prompt_mask, width - p.prompt_mask.shape[1], 0, False) for p in parts]),
        response_ids=torch.cat([pad(p.response_ids, 0, steps - p.response_ids.shape[1], pad_id) for p in parts]),
        response_mask=torch.cat([pad(p.response_mask, 0, steps - p.response_mask.shape[1], False) for p in parts]),
        sample_logprobs=torch.cat([pad(p.sample_logprobs, 0, steps - p.sample_logprobs.shape[1], 0.0)
                                   for p in parts]),
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        prompt_index=torch.cat([p.prompt_index for p in parts]),
        sample_index=torch.cat([p.sample_index for p in parts]),
        prompts=[x for p in parts for x in p.prompts], responses=[x for p in parts for x in p.responses])


def chat_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                    params: SamplingParams = SamplingParams(temperature=0.0), *, system: str | None = None,
                    precision: str = "fp32") -> Generation:
    """Responses to each text sent as a single user turn (after `system`, if given), sampled
    with `params` (greedy by default), all texts in one batch."""
    opening = [{"role": "system", "content": system}] if system else []
    conversations = [opening + [{"role": "user", "content": text}] for text in texts]
    prompts = [TokenizedPrompt(tokenize_prompt(c, tokenizer), c, {"messages": c}, i)
               for i, c in enumerate(conversations)]
    sampler = Sampler(model, tokenizer, precision=precision, batch_size=max(1, len(prompts) * params.n))
    return sampler.generate(prompts, params)


def chat_replies(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                 params: SamplingParams = SamplingParams(temperature=0.0), *, system: str | None = None,
                 precision: str = "fp32") -> list[str]:
    """`chat_generation`'s response texts, one per text (n must be 1), surrounding whitespace
    stripped. For looking at a model (`posttrain generate`, the demo, learning tests)."""
    if params.n != 1:
        raise ValueError(f"chat_replies: n={params.n}; one reply per text (use chat_generation for more)")
    gen = chat_generation(model, tokenizer, texts, params, system=system, precision=precision)
    return [reply.strip() for reply in gen.responses]
