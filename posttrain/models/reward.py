"""A reward model: a pretrained LM's decoder with a dense layer giving one scalar per sequence.

As the lecture notes (and Ouyang et al. 2022, InstructGPT §3.5) describe it: start from the
pretrained LM, replace its language-modelling head by a linear layer with one output, and
read that output at the last token of prompt + response, where the decoder has seen the
whole text. Here that token is the EOS ending the reply (`tokenize_pair` keeps it). A reply
that did not end with EOS (cut off at max_new_tokens, or stopped by a stop string) is read at
its own last token, whether the rollout's ids are scored or its text is rendered again
(`encode(..., finished=False)` leaves out the end-of-turn token the template would append).

The model is held as Hugging Face's own `XForSequenceClassification` with num_labels=1
(backbone under `model.`, head `score.weight`), so the saved folder loads with
`AutoModelForSequenceClassification`; but the score is read by this module's `forward`,
at the last column where attention_mask is 1. HF's head reads at the last token whose id
is not `config.pad_token_id`, which is wrong when pad == eos (SmolLM2): the EOS that ends
the reply counts as padding and the score lands on the token before it. The saved folder
therefore pads with a special token other than EOS (see `saved_pad_token`).

The whole computation sits inside `forward`, as DDP and FSDP need (see logprobs.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from posttrain.data import PreferencePair, tokenize_pair
from posttrain.models.attention import ATTENTION, decoder_hidden
from posttrain.models.load import LOAD_DTYPES, load_tokenizer, resolve_model_path
from posttrain.models.lora import save_model, without_peft_deprecation


def saved_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The pad token a saved reward model declares: its own if not EOS, else unk, else bos.

    HF's sequence-classification head reads the score at the last token that is not the pad
    id; with pad == eos that is the token before the reply's EOS. Any existing special token
    that never ends a sequence avoids that without growing the vocabulary.
    """
    for token in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and token != tokenizer.eos_token:
            return token
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no special token other than EOS "
                     f"{tokenizer.eos_token!r} to declare as padding for the saved reward model")


def check_reward_model_folder(folder: str, name: str) -> None:
    """ValueError naming `name` unless `folder` holds a reward model: a sequence classifier with
    one label, or a LoRA adapter for one (task SEQ_CLS), as `posttrain rm` saves them.

    Checked on the config alone, before any weight loads: HF would otherwise load a causal LM
    folder as a classifier with a fresh random head and only warn.
    """
    adapter = Path(folder) / "adapter_config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise ValueError(f"{name}: not a reward model: a LoRA adapter for task {task!r}, expected 'SEQ_CLS'")
        return
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: cannot read a model config ({str(err).strip().splitlines()[0]})") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise ValueError(f"{name}: not a reward model (architectures {architectures}, {config.num_labels} labels); "
                         "expected a sequence classifier with one label, as `posttrain rm` saves")


def _messages(value: str | list[dict[str, str]], role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


class RewardModel(torch.nn.Module):
    """r(x, o): forward(input_ids [B,T], attention_mask [B,T]) -> rewards [B] float32.

    Rows may be left- or right-padded with any pad id (EOS included): the reward is read at
    each row's last position with attention_mask 1, and position ids count real tokens only.
    `model` is an `XForSequenceClassification` with one label, optionally LoRA-wrapped
    (`apply_lora(..., task_type="SEQ_CLS")`, which keeps the head trainable);
    `tokenizer` renders (prompt, response) text with the model's own chat template.
    """

    def __init__(self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        base = self.base
        if base.config.num_labels != 1:
            raise ValueError(f"reward model {base.config.name_or_path!r}: expected num_labels=1, "
                             f"got {base.config.num_labels}")
        if not hasattr(base, "score"):
            raise ValueError(f"{type(base).__name__}: expected a `score` head (decoder-style "
                             "sequence classification), found none")

    @property
    def base(self) -> PreTrainedModel:
        """The sequence-classification model under an optional peft wrapper."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder: hidden states [B,T,H] of the last layer (LoRA layers injected, if any)."""
        return getattr(self.base, self.base.base_model_prefix)

    @property
    def head(self) -> torch.nn.Module:
        """The dense layer H -> 1 that replaces the LM head."""
        return self.base.score

    @classmethod
    def from_causal_lm(cls, name_or_path: str, *, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> RewardModel:
        """The causal LM's decoder with a fresh head; the LM head is not loaded.

        Head weights ~ N(0, 1/(H+1)) from a generator seeded with `seed`, as in "The N
        implementation details of RLHF" (std 1/√(d_model+1)), so initial rewards are O(1).
        """
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"dtype must be one of {LOAD_DTYPES}, got {dtype!r}")
        path = resolve_model_path(name_or_path)
        # A causal LM has no `score` weight by construction (it is initialised just below), so
        # HF's load report listing it as MISSING is noise here; other warnings still show.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                       attn_implementation=ATTENTION)
        finally:
            hf_logging.set_verbosity(verbosity)
        head = model.score
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.in_features + 1)
            head.weight.copy_(weight)
            if head.bias is not None:
                head.bias.zero_()
        return cls(model, load_tokenizer(name_or_path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> RewardModel:
        """A saved reward model (a merged folder, or a LoRA adapter folder, merged on load)."""
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"dtype must be one of {LOAD_DTYPES}, got {dtype!r}")
        folder = resolve_model_path(str(path))
        check_reward_model_folder(folder, f"reward model {str(path)!r}")
        if (Path(folder) / "adapter_config.json").is_file():
            with without_peft_deprecation():
                model = AutoPeftModelForSequenceClassification.from_pretrained(
                    folder, num_labels=1, dtype=dtype, attn_implementation=ATTENTION).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype,
                                                                       attn_implementation=ATTENTION)
        return cls(model, load_tokenizer(folder))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (float32) of the sequences in input_ids [B,T].

        attention_mask [B,T] padding mask (left or right padding): one sequence a row, rewards
        [B] read at each row's last real token. Or several causal sequences a row that may
        share columns (a prefix-shared preference pair, posttrain.models.pairs): attention_mask
        the [B,S,T] bool members, position_ids [B,T], and last [B,S] long, the column of each
        sequence's last token: rewards [B,S] read there.
        """
        if attention_mask.dim() == 3:
            if position_ids is None or last is None:
                raise ValueError("RewardModel: [B,S,T] sequence members need position_ids and last")
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(last)
            hidden = decoder_hidden(self.backbone, input_ids, attention_mask, position_ids,
                                    at=(rows.flatten(), last.flatten()))
            return self.head(hidden).squeeze(-1).float().view(last.shape)
        # Position ids count real tokens, so a left-padded row is computed as it would be
        # alone (HF's default numbers columns, padding included).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Last real token = last column with attention_mask 1 (left or right padding alike),
        # never "last id != pad", which is wrong when pad == eos.
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden = decoder_hidden(self.backbone, input_ids, attention_mask, position_ids, at=(rows, last))
        return self.head(hidden).squeeze(-1).float()

    def encode(self, prompt: str | list[dict[str, str]], response: str | list[dict[str, str]], *,
               finished: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids [T] of prompt + response, exactly as training tokenises a pair.

        prompt: a user message, or a conversation ending in a user turn. response: the
        assistant's reply, or a list of assistant messages. Rendered with this model's own
        chat template: a policy with another tokenizer hands over text, never token ids.
        finished=False: the reply did not end with the policy's EOS (cut off at
        max_new_tokens, or ended by a stop string), so the end-of-turn token the template
        appends is left out and the score is read at the reply's own last token, as on the
        rollout's ids. With max_length, such a reply is the finished one truncated to
        max_length + 1 tokens, less its last token.
        """
        reply = _messages(response, "assistant")
        limit = max_length if finished or max_length is None else max_length + 1
        pair = tokenize_pair(PreferencePair(_messages(prompt, "user"), reply, reply, None, 0),
                             self.tokenizer, max_length=limit)
        # chosen_ids end with the reply's EOS (tokenize_pair cuts the template's glue after it),
        # unless truncation already cut into the reply.
        ids = pair.prompt_ids + pair.chosen_ids
        return ids if finished else ids[:-1]

    @torch.no_grad()
    def score(self, prompts: list, responses: list, *, finished: list[bool] | None = None, batch_size: int = 8,
              max_length: int | None = None) -> torch.Tensor:
        """Rewards [N] (float32, on the CPU) of N (prompt, response) texts; see `encode`.

        finished: N flags, False where a reply did not end with EOS (None: all finished).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        if finished is not None and len(finished) != len(responses):
            raise ValueError(f"score: {len(finished)} finished flags but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"score: batch_size must be ≥ 1, got {batch_size}")
        flags = [True] * len(responses) if finished is None else finished
        sequences = [self.encode(p, r, finished=f, max_length=max_length)
                     for p, r, f in zip(prompts, responses, flags)]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        rewards = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start: start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            rewards.append(self(input_ids.to(device), attention_mask.to(device)).cpu())
        self.train(was_training)
        return torch.cat(rewards) if rewards else torch.zeros(0)

    def save_pretrained(self, out_dir: str | os.PathLike, *, merge_lora: bool = True) -> Path:
        """A folder `AutoModelForSequenceClassification` loads (num_labels=1) plus the tokenizer.

        The tokenizer and config declare `saved_pad_token` as padding, so HF's own head reads
        the same token as `forward` on right-padded batches.
        """
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.pad_token = saved_pad_token(tokenizer)
        self.base.config.pad_token_id = tokenizer.pad_token_id
        return save_model(self.model, tokenizer, out_dir, merge_lora=merge_lora)
