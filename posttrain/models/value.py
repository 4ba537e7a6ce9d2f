"""PPO's trained networks: the critic V(s_t), and the policy + critic as one module.

Shapes: B batch, T = Q + A (prompt then response columns), A response tokens, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses import chunked_logprobs, chunked_logprobs_and_entropy
from posttrain.models.attention import decoder_hidden
from posttrain.models.logprobs import base_causal_lm, check_supported
from posttrain.models.reward import RewardModel


class ValueModel(torch.nn.Module):
    """V(s_t) at every position: a reward model's decoder and scalar head, read per token.

    forward(input_ids [B,T], attention_mask [B,T], position_ids [B,T]) -> values [B,T] float32.
    Initialised from the reward model (as Ouyang et al. 2022 and TRL do), its head predicts
    the final score from the start; from a causal LM (`from_causal_lm`) the head is zero, so
    every value starts at 0 rather than at a random offset.
    """

    def __init__(self, reward_model: RewardModel):
        super().__init__()
        self.reward_model = reward_model

    @classmethod
    def from_causal_lm(cls, name_or_path: str) -> ValueModel:
        rm = RewardModel.from_causal_lm(name_or_path)
        with torch.no_grad():
            rm.head.weight.zero_()
        return cls(rm)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = decoder_hidden(self.reward_model.backbone, input_ids, attention_mask, position_ids)
        return self.reward_model.head(hidden).squeeze(-1).float()


def response_logprobs(lm: torch.nn.Module, input_ids, attention_mask, position_ids, response_mask, *,
                      temperature: float, with_entropy: bool, chunk_size: int = 1024):
    """Log-probs [B,A] of the response tokens (the last A columns) at `temperature`, the
    entropy [B,A] of those distributions (None unless with_entropy), and the decoder's hidden
    states [B,T,H]. Both are zero off response_mask.

    The LM head runs at response positions only, chunked, never over the prompt; logits are
    scaled as logits / temperature, what the sampler drew from (before top-p).

    With [N,S,T] sequence members for attention_mask (a prompt and its responses a row,
    `Generation.shared_prompt_rows`), response_mask is the [N,T] mask of target columns and
    log-probs and entropy are [N,T], aligned with input_ids (0 at column 0).
    """
    causal_lm = base_causal_lm(lm)
    hidden = decoder_hidden(causal_lm.get_decoder(), input_ids, attention_mask, position_ids)
    aligned = attention_mask is not None and attention_mask.dim() == 3
    n_query = 1 if aligned else input_ids.shape[1] - response_mask.shape[1]
    # hidden[t-1] predicts token t; (h/τ)·Wᵀ = (h·Wᵀ)/τ.
    before = hidden[:, n_query - 1: -1] / temperature
    weight = causal_lm.get_output_embeddings().weight
    device = input_ids.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    response_ids = input_ids[:, n_query:]
    targets = response_mask[:, 1:] if aligned else response_mask
    entropy = None
    if with_entropy:
        logprobs, entropy = chunked_logprobs_and_entropy(before, weight, response_ids, targets, chunk_size=chunk_size,
                                                         compute_dtype=dtype)
        entropy = entropy.float()
    else:
        logprobs = chunked_logprobs(before, weight, response_ids, targets, chunk_size=chunk_size, compute_dtype=dtype)
    logprobs = logprobs.float()
    if aligned:  # column 0 is never a target
        logprobs, entropy = F.pad(logprobs, (1, 0)), None if entropy is None else F.pad(entropy, (1, 0))
    return logprobs, entropy, hidden


class PolicyAndValue(torch.nn.Module):
    """The trained networks in one module, so data-parallel wrappers see every trained
    parameter used inside one forward.

    forward(input_ids [B,T], attention_mask [B,T], position_ids [B,T], response_mask [B,A] bool,
            with_entropy, with_values) -> (logprobs [B,A], entropy [B,A] or None, values [B,A] or None)

    values[:, t] = V(s_t), read at the column before response token t (the state it is
    chosen in), like the log-prob. The critic is either a separate `ValueModel` or a
    `value_head` Linear(H, 1) on the policy's own hidden states (one decoder pass for both);
    at most one is given. Without either (GRPO, RLOO: no critic), or with with_values=False (a
    reference pass with LoRA adapters off), values is None. With shared-prompt rows (attention_mask
    [N,S,T], `response_logprobs`) the shapes are [N,T], and values are refused (ValueError).
    Without a critic it is also the frozen reference's module: log-probs come from its forward,
    which sharding needs (trainers/sharding.py).
    """

    def __init__(self, policy: torch.nn.Module, *, critic: ValueModel | None = None,
                 value_head: torch.nn.Linear | None = None, temperature: float = 1.0):
        super().__init__()
        if critic is not None and value_head is not None:
            raise ValueError("PolicyAndValue: give at most one of critic and value_head")
        check_supported(base_causal_lm(policy))
        self.policy, self.critic, self.value_head = policy, critic, value_head
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, position_ids, response_mask, with_entropy: bool = False,
                with_values: bool = True):
        logprobs, entropy, hidden = response_logprobs(self.policy, input_ids, attention_mask, position_ids,
                                                      response_mask, temperature=self.temperature,
                                                      with_entropy=with_entropy)
        if not with_values or (self.critic is None and self.value_head is None):
            return logprobs, entropy, None
        if attention_mask is not None and attention_mask.dim() == 3:
            raise ValueError("PolicyAndValue: values are read a response a row; shared-prompt rows give log-probs only")
        n_query = input_ids.shape[1] - response_mask.shape[1]
        if self.critic is not None:
            all_values = self.critic(input_ids, attention_mask, position_ids)
        else:
            all_values = self.value_head(hidden).squeeze(-1).float()
        values = all_values[:, n_query - 1: -1]
        return logprobs, entropy, torch.where(response_mask, values, 0.0)


def new_value_head(hidden_size: int) -> torch.nn.Linear:
    """Linear(H, 1) with zero weights and bias: every value starts at 0."""
    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere in `model`, in train mode too, so passes whose log-probs are compared
    (π_old and π_θ in PPO/GRPO, policy and reference in DPO/KTO) are the same function: the
    ratio is 1 at the first minibatch, DPO's first loss is ln 2. TRL's `disable_dropout_in_model`
    sets p = 0 in Dropout modules (LoRA's lora_dropout is one); HF attention applies
    `self.attention_dropout`, a float, through the functional form, so every float attribute
    named *dropout* is zeroed too. Call it after adapters are added. The model's config is left
    alone: it is what gets saved.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


__all__ = ["PolicyAndValue", "ValueModel", "disable_dropout", "new_value_head", "response_logprobs"]
