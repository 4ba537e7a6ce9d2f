"""Judge specs, `KIND:TARGET`, shared by every command: `rm:PATH`, `fn:module:function`, `llm:MODEL`.

rm and fn score one response at a time (a `Scorer`); llm compares two (an `LLMJudge`), so
pointwise users (PPO, `posttrain score`) refuse it and `posttrain judge` writes pairs with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from posttrain.scoring.function import load_function_scorer
from posttrain.scoring.judge import DEFAULT_TIE_MARGIN, LLMJudge, load_llm_judge
from posttrain.scoring.reward_model import load_reward_model_scorer


class Scorer(Protocol):
    """One score per response: score(prompts, responses, records=None, *, finished=None) -> N floats.

    prompts: N user strings or conversations (lists of {role, content}) ending in a user
    turn. responses: N reply strings. records: the N source records (a reward function may
    read them). finished: N flags, False where the reply did not end with the policy's EOS
    (cut off at max_new_tokens, or stopped by a stop string); None means all did.
    """

    spec: str

    def score(self, prompts: list, responses: list, records: list | None = None, *,
              finished: list[bool] | None = None) -> list[float]: ...


@dataclass(frozen=True)
class JudgeKind:
    """One kind of judge spec."""

    target: str
    """What follows "KIND:", as help and errors print it."""
    pairwise: bool
    """Compares two responses (LLMJudge) rather than scoring one (Scorer)."""
    load: Callable
    """(target, spec, *, batch_size, precision, device, [rubric, tie_margin]) -> Scorer or LLMJudge."""


JUDGE_KINDS = {
    "rm": JudgeKind("PATH", False, load_reward_model_scorer),
    "fn": JudgeKind("module:function", False, load_function_scorer),
    "llm": JudgeKind("MODEL", True, load_llm_judge),
}
"""Spec kind -> how it loads; the keys are the kinds every command accepts."""

SPEC_HELP = " | ".join(f"{kind}:{k.target}" for kind, k in JUDGE_KINDS.items())


def parse_spec(spec: str) -> tuple[str, str]:
    """"KIND:TARGET" -> (kind, target), whitespace around either stripped; ValueError naming the
    spec and the kinds otherwise."""
    kind, sep, target = (part.strip() for part in spec.partition(":"))
    if not sep or kind not in JUDGE_KINDS or not target:
        raise ValueError(f"judge {spec!r}: unknown judge spec, expected one of {SPEC_HELP}")
    return kind, target


def is_pairwise(spec: str) -> bool:
    """Whether `spec` names a judge that compares pairs (llm) rather than scoring responses."""
    return JUDGE_KINDS[parse_spec(spec)[0]].pairwise


def pointwise_spec(spec: str) -> tuple[str, str]:
    """(kind, target) of a spec that scores one response at a time; ValueError for an llm: judge."""
    kind, target = parse_spec(spec)
    if JUDGE_KINDS[kind].pairwise:
        pointwise = " or ".join(f"{name}:{k.target}" for name, k in JUDGE_KINDS.items() if not k.pairwise)
        raise ValueError(f"judge {spec!r}: the LLM judge compares pairs of responses (`posttrain judge`); "
                         f"a score per response needs {pointwise}")
    return kind, target


def load_scorer(spec: str, *, batch_size: int = 8, precision: str = "auto",
                device: str | torch.device = "cpu") -> Scorer:
    """The pointwise scorer of an `rm:` or `fn:` spec. A reward model is frozen in the compute
    precision and moved to `device`; `batch_size` sequences per forward pass."""
    kind, target = pointwise_spec(spec)
    return JUDGE_KINDS[kind].load(target, f"{kind}:{target}", batch_size=batch_size, precision=precision,
                                  device=device)


def load_judge(spec: str, *, rubric: str | None = None, tie_margin: float = DEFAULT_TIE_MARGIN,
               batch_size: int = 8, precision: str = "auto", device: str | torch.device = "cpu") -> LLMJudge:
    """The pairwise judge of an `llm:` spec, with the rubric file `rubric` (None: the default)."""
    kind, target = parse_spec(spec)
    if not JUDGE_KINDS[kind].pairwise:
        raise ValueError(f"judge {spec!r}: scores one response at a time; comparing pairs needs "
                         + " or ".join(f"{name}:{k.target}" for name, k in JUDGE_KINDS.items() if k.pairwise))
    return JUDGE_KINDS[kind].load(target, f"{kind}:{target}", rubric=rubric, tie_margin=tie_margin,
                                  batch_size=batch_size, precision=precision, device=device)
