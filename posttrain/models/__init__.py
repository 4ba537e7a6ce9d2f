"""Model loading: any Hugging Face causal LM, the embedded SmolLM2 default, and a tiny random model."""

from posttrain.models.load import BUILTIN_MODELS, load_causal_lm, load_tokenizer, resolve_model_path

__all__ = ["BUILTIN_MODELS", "load_causal_lm", "load_tokenizer", "resolve_model_path"]
