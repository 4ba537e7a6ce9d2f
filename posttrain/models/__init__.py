"""Model loading: any Hugging Face causal LM, the embedded SmolLM2 default, and a tiny random model."""

from posttrain.models.chat_template import (fit_model_to_tokenizer, install_chat_template,
                                            load_tokenizer_with_template)
from posttrain.models.load import BUILTIN_MODELS, load_causal_lm, load_tokenizer, resolve_model_path

__all__ = ["BUILTIN_MODELS", "fit_model_to_tokenizer", "install_chat_template", "load_causal_lm", "load_tokenizer",
           "load_tokenizer_with_template", "resolve_model_path"]
