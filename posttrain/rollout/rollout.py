"""PPO's rollout: a `Generation` (stage 1, from `posttrain.sampling`) with everything the
update needs (stages 2 and 3), fixed for the iteration.

Shapes: B rollouts, A response tokens. Every mask is named after what it includes; True counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.sampling import Generation


@dataclass
class Rollout(Generation):
    """A generation with its scores, and the log-probs and values PPO's update compares
    against. `logprobs` are recomputed by a teacher-forced forward of the trained policy at the
    sampling temperature, in the training precision — not the sampler's `sample_logprobs`."""

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
