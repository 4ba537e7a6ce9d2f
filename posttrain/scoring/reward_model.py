"""A reward model, `rm:PATH`: its scalar head read at the response's last token.

That token is the EOS the policy ended the reply with, or, for a reply that did not end with
EOS (cut off at max_new_tokens, or stopped by a stop string), its own last token: the
end-of-turn token a chat template appends is never added to a reply that lacked it, so the
rollout's ids and the re-rendered text are read at the same position.

Shapes: B sequences, T tokens.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.models.load import resolve_model_path
from posttrain.models.precision import autocast, resolve_precision
from posttrain.models.reward import RewardModel, check_reward_model_folder
from posttrain.scoring.function import ScoreError


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids of one mean the same text, templated the same way, in the other."""
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


class RewardModelScorer:
    """`rm:PATH` as a Scorer. score(prompts, responses, records=None, *, finished=None) -> N floats.

    prompts: user strings or conversations ending in a user turn; responses: reply strings
    (or lists of assistant messages); records are not used; finished: N flags, False where a
    reply did not end with EOS (None: all did). `score_ids` scores token ids directly.
    The model is frozen; forward passes run under bf16 autocast when `precision` is "bf16".
    """

    def __init__(self, model: RewardModel, spec: str, *, batch_size: int = 8, precision: str = "fp32"):
        if batch_size < 1:
            raise ValueError(f"{spec}: batch_size must be ≥ 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.batch_size = batch_size
        self.precision = precision

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, prompts: list, responses: list, records: list | None = None, *,
              finished: list[bool] | None = None) -> list[float]:
        """ScoreError naming the row of a prompt + response longer than the model's positions:
        a RoPE model would score it anyway, at positions it never saw in training."""
        # Every HF decoder config answers max_position_embeddings (GPT-2's maps it to n_positions);
        # None is a config without a position limit.
        limit = getattr(self.model.base.config, "max_position_embeddings", None)
        flags = [True] * len(responses) if finished is None else finished
        for row, (prompt, response, done) in enumerate(zip(prompts, responses, flags)):
            length = len(self.model.encode(prompt, response, finished=done))
            if limit is not None and length > limit:
                raise ScoreError(f"{self.spec}: prompt and response are {length} tokens, more than the model's "
                                 f"{limit} positions", row=row)
        with autocast(self.precision, self.device.type):
            return self.model.score(prompts, responses, finished=finished, batch_size=self.batch_size).tolist()

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B] float32 on the CPU of input_ids [B, T] (any padding), read at each row's
        last position with attention_mask [B, T] 1."""
        out = []
        with autocast(self.precision, self.device.type):
            for start in range(0, input_ids.shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                out.append(self.model(input_ids[rows].to(self.device), attention_mask[rows].to(self.device)).cpu())
        return torch.cat(out).float() if out else torch.zeros(0)


def load_reward_model_scorer(target: str, spec: str, *, batch_size: int = 8, precision: str = "auto",
                             device: str | torch.device = "cpu") -> RewardModelScorer:
    """The scorer of `rm:{target}`: the reward model folder (or adapter) `target`, stored in the
    compute precision (bf16 when `precision` resolves to it: it is never trained here)."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device.type)
    try:
        folder = resolve_model_path(target)
    except ValueError as err:
        raise ValueError(f"{spec}: {err}") from None
    # Checked here too, so the message names the spec rather than the folder alone.
    check_reward_model_folder(folder, spec)
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float32
    model = RewardModel.from_pretrained(folder, dtype=dtype).to(device)
    return RewardModelScorer(model, spec, batch_size=batch_size, precision=resolved)
