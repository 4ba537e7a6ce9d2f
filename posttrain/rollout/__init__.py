"""PPO's rollouts as data: sampling (stage 1) into a `Rollout`, and scoring (stage 2) with a
reward model or a reward function. Trainers compute everything after that from the Rollout."""

from posttrain.rollout.rollout import Generation, Rollout, generate_rollouts, response_masks, sampling_config
from posttrain.rollout.scoring import (RunningMoments, call_reward_fn, load_reward_fn, normalize_and_clip,
                                       penalize_missing_eos, reward_model_scores, same_tokenization)

__all__ = ["Generation", "Rollout", "RunningMoments", "call_reward_fn", "generate_rollouts", "load_reward_fn",
           "normalize_and_clip", "penalize_missing_eos", "response_masks", "reward_model_scores",
           "same_tokenization", "sampling_config"]
