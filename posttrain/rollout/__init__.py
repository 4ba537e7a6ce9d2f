"""PPO's rollouts as data: a `Rollout` extends the sampler's `Generation` (stage 1) with scores
(stage 2; the scores come from `posttrain.scoring`, shaped here) and log-probs and values
(stage 3). Trainers compute everything after that from the Rollout."""

from posttrain.rollout.rollout import Rollout
from posttrain.rollout.scoring import RunningMoments, normalize_and_clip, penalize_missing_eos

__all__ = ["Rollout", "RunningMoments", "normalize_and_clip", "penalize_missing_eos"]
