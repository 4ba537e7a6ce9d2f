"""posttrain RLOO (RLOOConfig's defaults, β = 0.05 in the reward) through its Python API.

The loop, clock and counts of posttrain_grpo.py; RLOOConfig gives a leave-one-out baseline,
no std scaling, the dr_grpo reduction and the KL in the reward: r − β · Σ_t log π_old/π_ref
(k1), with log π_old from a no-grad forward of the policy.
"""

from posttrain_grpo import run

from posttrain.config import RLOOConfig

run(RLOOConfig, beta=0.05, kl_in_reward=True)
