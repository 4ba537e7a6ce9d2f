"""Stage 2 of PPO, after scoring (`posttrain.scoring`): the missing-EOS penalty, running
normalisation and clipping of the raw scores.

Shapes: B rollouts.
"""

from __future__ import annotations

import math

import torch


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
