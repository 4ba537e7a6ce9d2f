"""A causal LM whose forward returns token log-probs only where they are needed.

Every trainer needs log π(token | prefix) at some positions (SFT: completion tokens; DPO:
chosen and rejected completions; PPO: response tokens). Projecting every position onto a
49k vocabulary wastes most of the LM-head work and memory, so the decoder's hidden states
go through `chunked_logprobs` at the selected positions only.

The whole computation sits inside `forward` on purpose: DDP's gradient hooks and FSDP's
parameter gathering only work for parameters used inside the wrapped module's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel

from posttrain.losses import chunked_logprobs
from posttrain.models.attention import decoder_hidden


def base_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under an optional peft wrapper (adapters stay injected)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def check_supported(model: PreTrainedModel) -> None:
    """Refuse models whose logits are more than hidden @ lm_head.weight."""
    cfg = model.config
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, key, None) not in (None, 1.0):
            raise ValueError(f"model {cfg.name_or_path!r}: {key}={getattr(cfg, key)!r} is not supported "
                             "by posttrain's chunked LM head")
    head = model.get_output_embeddings()
    if head is None or head.bias is not None:
        raise ValueError(f"model {cfg.name_or_path!r}: expected an LM head without bias")


class TokenLogprobs(torch.nn.Module):
    """Wraps a causal LM (optionally a PeftModel) for training.

    forward(input_ids [B,T], attention_mask [B,T], [B,S,T], [B,1,T,T] or None (decoder_hidden's
            forms), position_ids [B,T], target_mask [B,T] bool) -> logprobs [B,T] float32

    `logprobs[b, t]` = log π(input_ids[b, t] | input_ids[b, :t]) where `target_mask[b, t]`,
    and 0 elsewhere; position 0 is never a target. The output is aligned with input_ids so
    callers never shift by hand. With [B,S,T] sequence members or a [B,1,T,T] bool mask,
    "input_ids[b, :t]" means the tokens column t attends to: the earlier ones of its first
    sequence (posttrain.models.pairs lays prefix-shared preference pairs out so), or the keys
    its mask row allows (transformers 5.24, masking_utils._preprocess_mask_arguments, passes 4D
    masks to SDPA unchanged).
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        check_supported(base_causal_lm(model))

    def hidden_states(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Last decoder layer's output [B,T,H] (the LM head not applied)."""
        return decoder_hidden(base_causal_lm(self.model).get_decoder(), input_ids, attention_mask, position_ids)

    def forward(self, input_ids, attention_mask, position_ids, target_mask) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        weight = base_causal_lm(self.model).get_output_embeddings().weight
        device = input_ids.device.type
        # Under autocast the LM-head matmuls run in the autocast dtype (bf16), as HF's own
        # head would; log-sum-exp stays in fp32 inside chunked_logprobs.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # hidden[t-1] predicts token t.
        logprobs = chunked_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], target_mask[:, 1:],
                                    chunk_size=self.chunk_size, compute_dtype=dtype)
        return F.pad(logprobs.float(), (1, 0))
