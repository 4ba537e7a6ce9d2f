"""Building training data from a model's own samples.

best_of_n.py — `posttrain best-of-n`: the best scored reply per prompt, or every reply above a
threshold, as SFT records (best-of-N and rejection-sampling fine-tuning).
"""

from posttrain.datagen.best_of_n import BestOfNSummary, best_of_n_file, ranks, select

__all__ = ["BestOfNSummary", "best_of_n_file", "ranks", "select"]
