"""Building training data: from task datasets by templates, and from a model's own samples.

templates.py — `posttrain data template`: instruction pairs from a supervised task dataset by
templates (Flan-style); the shipped template library is templates/*.yaml.
mix.py — `posttrain data mix`: a task mixture drawn from several sources by weight, with a cap.
cli.py — the `posttrain data` command and its registry of subcommands.
best_of_n.py — `posttrain best-of-n`: the best scored reply per prompt, or every reply above a
threshold, as SFT records (best-of-N and rejection-sampling fine-tuning).

The names below are imported on first use, not with the package: `posttrain.cli` builds the
`data` command from this package on every call, and best_of_n pulls in transformers (seconds).
"""

from importlib import import_module

_EXPORTS = {
    "BestOfNSummary": "posttrain.datagen.best_of_n", "best_of_n_file": "posttrain.datagen.best_of_n",
    "ranks": "posttrain.datagen.best_of_n", "select": "posttrain.datagen.best_of_n",
    "Task": "posttrain.datagen.templates", "Template": "posttrain.datagen.templates",
    "instruction_pairs": "posttrain.datagen.templates", "load_templates": "posttrain.datagen.templates",
    "template_file": "posttrain.datagen.templates",
    "mix_files": "posttrain.datagen.mix", "mix_records": "posttrain.datagen.mix",
    "mixture_counts": "posttrain.datagen.mix",
}
"""Public name → the module defining it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'posttrain.datagen' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
