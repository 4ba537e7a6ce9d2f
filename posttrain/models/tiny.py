"""A tiny random Llama and a character-level ChatML tokenizer, built offline in milliseconds.

They mirror the embedded SmolLM2-135M-Instruct where it matters to the trainers (Llama
architecture with grouped-query attention and tied embeddings; ChatML turns; pad == eos ==
`<|im_end|>`), so every test can run the same code paths without touching a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.models.attention import ATTENTION
from posttrain.models.cache import build_once

UNK, IM_START, IM_END, ENDOFTEXT = "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Printable ASCII (space..tilde) plus newline and tab, so decode(encode(s)) == s for any
# ordinary ASCII text. Ids 0-2 are the special tokens, in SmolLM2's order (unk, im_start, im_end).
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]

# SmolLM2-135M-Instruct's GGUF template, minus the default system prompt it injects when the
# first message is not a system turn ("You are a helpful AI assistant named SmolLM, ..."): a
# test should see exactly the turns it wrote.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, vocab size 3 + len(CHARS) = 100.

    Characters outside CHARS encode to `<unk>` (id 0). No BOS/EOS is added by `encode`; the
    chat template writes `<|im_start|>` / `<|im_end|>` itself, as SmolLM2's does.
    """
    vocab = {tok: i for i, tok in enumerate([UNK, IM_START, IM_END, *CHARS])}
    # BPE with no merges and no pre-tokenizer splits text into single characters; the Fuse
    # decoder joins them back without the spaces the default decoder would insert.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,  # SmolLM2 pads with its EOS too (GGUF padding_token_id == eos_token_id)
        model_max_length=2048,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_base_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer as a base model ships one (GPT-2's way): no chat template, no ChatML
    tokens, a single special `<|endoftext|>` (id 1) as EOS and no pad. Vocab size 2 + len(CHARS) = 99.

    For `--chat-template`: installing ChatML on it must add tokens and grow the embeddings.
    """
    vocab = {tok: i for i, tok in enumerate([UNK, ENDOFTEXT, *CHARS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=ENDOFTEXT,
                                   model_max_length=2048)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama with vocabulary len(tokenizer); same seed, same weights.

    Embeddings are tied (lm_head.weight is embed_tokens.weight) because SmolLM2 ties them, and
    tying is what trips up LoRA merging and saving; the tiny model should exercise that path.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,  # grouped-query attention, as SmolLM2 (9 heads, 3 kv)
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=ATTENTION,
    )
    # fork_rng: a seeded build must not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def tiny_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache root>/tiny-random`: the seed-0 tiny model and its tokenizer as an ordinary HF folder.

    Written once (atomically) on first call; loadable with AutoModelForCausalLM / AutoTokenizer.
    """

    def write(folder: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return build_once("tiny-random", write, cache_dir)
