"""The one scorer interface, behind a spec string every command shares (`specs.py`):

* `rm:PATH` — a reward model, read at the response's last token (`reward_model.py`);
* `fn:module:function` — a programmatic reward (`function.py`);
* `llm:MODEL` — an LLM judge comparing two responses in both orders (`judge.py`).

rm and fn are `Scorer`s, score(prompts, responses, records=None, *, finished=None) -> list of
floats; `score_generation` scores a sampled Generation (PPO). llm is an `LLMJudge`;
`files.py` holds the `posttrain score` and `posttrain judge` commands.
"""

from posttrain.scoring.function import FunctionScorer, ScoreError, call_reward_fn, load_reward_fn
from posttrain.scoring.generation import score_generation
from posttrain.scoring.judge import (DEFAULT_RUBRIC, DEFAULT_TIE_MARGIN, JUDGE_PAIRINGS, LABELS, LLMJudge,
                                     NextTokenLabels, Rubric, Verdict, label_token_ids, load_rubric, select_pairs,
                                     verdict)
from posttrain.scoring.reward_model import RewardModelScorer, same_tokenization
from posttrain.scoring.specs import (JUDGE_KINDS, SPEC_HELP, Scorer, is_pairwise, load_judge, load_scorer,
                                     parse_spec, pointwise_spec)

__all__ = [
    "DEFAULT_RUBRIC", "DEFAULT_TIE_MARGIN", "FunctionScorer", "JUDGE_KINDS", "JUDGE_PAIRINGS", "LABELS", "LLMJudge",
    "NextTokenLabels", "RewardModelScorer", "Rubric", "SPEC_HELP", "ScoreError", "Scorer", "Verdict",
    "call_reward_fn", "is_pairwise", "label_token_ids", "load_judge", "load_reward_fn", "load_rubric",
    "load_scorer", "parse_spec", "pointwise_spec", "same_tokenization", "score_generation", "select_pairs",
    "verdict",
]
