"""posttrain: post-training for language models (SFT, reward models, DPO, PPO)."""

__version__ = "0.1.0"
