"""TRL 1.16 RLOOTrainer (its defaults: β = 0.05 in the reward, no advantage normalisation) on the
same prompts, K, lengths and reward as posttrain_rloo.py.

The set-up, clock and counts of trl_grpo.py. TRL's RLOO always computes log π_old with a
no-grad forward of the policy and subtracts β · Σ_t (log π_old − log π_ref) (k1) from each
response's reward; its loss clips one ratio per response (exp of the summed token log-ratios)
and averages over responses. Its `_generate_single_turn` returns the completion ids alone.
"""

from trl import RLOOConfig, RLOOTrainer
from trl_grpo import run

run(RLOOTrainer, RLOOConfig, lambda out: out, beta=0.05, normalize_advantages=False)
