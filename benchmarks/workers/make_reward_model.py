"""The reward / value model both PPO workers start from: the LM with a fresh scalar head.

    python benchmarks/workers/make_reward_model.py MODEL_PATH OUT_DIR

Built and saved by posttrain's RewardModel (what `posttrain rm` writes), a folder that
AutoModelForSequenceClassification(num_labels=1) loads, so TRL and posttrain read the same
weights. Seeded, so every run gets the same head.
"""

import sys

from posttrain.models.reward import RewardModel

model_path, out_dir = sys.argv[1], sys.argv[2]
RewardModel.from_causal_lm(model_path, seed=0).save_pretrained(out_dir)
print(f"saved {out_dir}")
