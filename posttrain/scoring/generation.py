"""Scores of a sampled `Generation` (PPO's stage 2): one float per response, on the rollout's own
token ids when the reward model reads them as the policy wrote them, else on the text.

Shapes: B responses, T = prompt + response tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.scoring.reward_model import RewardModelScorer, same_tokenization
from posttrain.scoring.specs import Scorer

if TYPE_CHECKING:  # read only through its fields; scoring/ and sampling/ sit side by side
    from posttrain.sampling.generation import Generation


def score_generation(scorer: Scorer, gen: Generation, messages: list[list[dict[str, str]]], records: list, *,
                     tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Scores [B] float32 on the CPU of the B responses of `gen`.

    messages / records: the prompt conversations and source records `gen.prompt_index`
    points into. tokenizer: the policy's. A reward model whose tokenization matches it
    (`same_tokenization`) scores prompt + response ids as sampled, read at each row's last
    response token (EOS, a stop string's last token, or the last token before
    max_new_tokens); otherwise every scorer gets the texts with finished = "ended with EOS",
    so a reward model reading re-rendered text lands on the same position.
    """
    if isinstance(scorer, RewardModelScorer) and same_tokenization(scorer.model.tokenizer, tokenizer):
        input_ids, attention, _ = gen.sequences()
        return scorer.score_ids(input_ids, attention)
    index = gen.prompt_index.tolist()
    finished = [reason == "eos" for reason in gen.finish_reasons]
    scores = scorer.score([messages[i] for i in index], list(gen.responses), [records[i] for i in index],
                          finished=finished)
    return torch.tensor(scores, dtype=torch.float32)
