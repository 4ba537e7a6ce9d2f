"""Stage 2 of PPO: a score per response, from a reward model or a reward function.

Shapes: B rollouts, T prompt + response tokens.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data import TokenizedPrompt
from posttrain.models.reward import RewardModel
from posttrain.rollout.rollout import Generation

RewardFn = Callable[..., list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """`module:function` -> the function, called f(prompts, responses) -> list of B floats.

    prompts are the last user turns, responses the decoded replies (special tokens
    removed). A function with a parameter named `records` also gets the B source records
    (for reference answers and other fields of the prompt file).
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"reward_fn={spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward_fn={spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn={spec!r}: {module_name} has no function {name!r}")
    return fn


def call_reward_fn(fn: RewardFn, spec: str, gen: Generation, prompts: list[TokenizedPrompt]) -> torch.Tensor:
    """Scores [B] float32 of a generation from a reward function; fails on a wrong count,
    a non-number or a non-finite value, naming the function and the row."""
    kwargs = {}
    if "records" in inspect.signature(fn).parameters:
        kwargs["records"] = [prompts[i].record for i in gen.prompt_index.tolist()]
    out = list(fn(list(gen.prompts), list(gen.responses), **kwargs))
    if len(out) != len(gen.responses):
        raise ValueError(f"reward_fn {spec}: returned {len(out)} scores for {len(gen.responses)} responses")
    for row, value in enumerate(out):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward_fn {spec}: score {row} is {value!r}, expected a finite number")
    return torch.tensor(out, dtype=torch.float32)


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids of one mean the same text, templated the same way, in the other."""
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


@torch.no_grad()
def reward_model_scores(rm: RewardModel, gen: Generation, prompts: list[TokenizedPrompt], *,
                        reuse_ids: bool, batch_size: int, device) -> torch.Tensor:
    """Scores [B] float32 of a generation from the reward model, read at each response's
    last token (the EOS that ended it, or the last sampled token of a truncated one).

    With reuse_ids (same tokenization) the rollout's own prompt + response ids are scored,
    no decoding; otherwise the texts are re-rendered with the reward model's chat template.
    The caller sets autocast.
    """
    if not reuse_ids:
        messages = [prompts[i].messages for i in gen.prompt_index.tolist()]
        return rm.score(messages, list(gen.responses), batch_size=batch_size)
    input_ids, attention, _ = gen.sequences()
    out = [rm(input_ids[i: i + batch_size].to(device), attention[i: i + batch_size].to(device)).cpu()
           for i in range(0, input_ids.shape[0], batch_size)]
    return torch.cat(out).float()


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel
    update), for score normalisation across iterations; checkpointed with the run."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n, mean = x.numel(), float(x.double().mean())
        m2 = float(((x.double() - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def penalize_missing_eos(raw: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores [B] minus `penalty` where the response hit the length limit (ended [B] False).

    TRL's `missing_eos_penalty`: a cut-off reply would otherwise be scored as if complete,
    and a reward model often likes long text. Subtracted, so the penalty is in score units.
    """
    return raw - penalty * (~ended).float()


def normalize_and_clip(scores: torch.Tensor, moments: RunningMoments | None, clip: float) -> torch.Tensor:
    """Scores [B] standardised by running statistics the caller has already updated with this
    batch (the reward normalisation of "The N implementation details of RLHF", running rather
    than frozen at the start), then clipped to [−clip, clip] when clip > 0 (OpenRLHF)."""
    if moments is not None:
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    return scores.clamp(-clip, clip) if clip > 0 else scores
