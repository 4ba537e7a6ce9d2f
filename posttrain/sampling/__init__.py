"""The one sampler: prompts × n → a `Generation` (fast decode lives here)."""

from posttrain.sampling.generation import FINISH_REASONS, Generation
from posttrain.sampling.sampler import (Sampler, SamplingParams, chat_generation, chat_replies, choose_tokens, concat, left_pad,
                                       sequence_seed)

__all__ = ["FINISH_REASONS", "Generation", "Sampler", "SamplingParams", "chat_generation", "chat_replies", "choose_tokens", "concat",
           "left_pad", "sequence_seed"]
