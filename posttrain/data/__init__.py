"""Records, validation, chat templates, tokenizing, packing and collation.

read_records (records.py) → sft_messages / preference_pairs / prompt_messages (formats.py)
→ tokenize_conversation / tokenize_pair / tokenize_prompt (tokenize.py) → pad_batch /
pack_examples + collate_packed (collate.py). load.py chains the first three for a source.
"""

from posttrain.data.collate import Batch, collate_packed, pack_examples, pad_batch
from posttrain.data.errors import DataError, RecordError
from posttrain.data.formats import (FINISH_REASONS, LabelledCompletion, PreferencePair, SampledResponses,
                                     ScoredResponses, labelled_completions, preference_pairs, prompt_messages,
                                     sampled_responses, scored_responses, scoring_conversation, sft_messages)
from posttrain.data.load import (
    LoadReport,
    TokenizedPrompt,
    load_labelled_completions,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
)
from posttrain.data.records import read_records
from posttrain.data.tokenize import (
    TokenizedCompletion,
    TokenizedExample,
    TokenizedPair,
    tokenize_completion,
    tokenize_conversation,
    tokenize_pair,
    tokenize_prompt,
)

__all__ = [
    "FINISH_REASONS", "SampledResponses", "sampled_responses", "ScoredResponses", "scored_responses",
    "scoring_conversation",
    "Batch", "DataError", "LoadReport", "PreferencePair", "RecordError", "TokenizedExample",
    "TokenizedPair", "TokenizedPrompt", "collate_packed", "load_preference_pairs", "load_prompts",
    "load_sft_examples", "pack_examples", "pad_batch", "preference_pairs", "prompt_messages",
    "read_records", "sft_messages", "tokenize_conversation", "tokenize_pair", "tokenize_prompt",
    "LabelledCompletion", "TokenizedCompletion", "labelled_completions", "load_labelled_completions",
    "tokenize_completion",
]
