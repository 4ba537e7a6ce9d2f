"""Rollouts: the Rollout dataclass, the critic's reading, score shaping."""

from __future__ import annotations

import pytest
import torch

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.models.reward import RewardModel
from posttrain.models.value import ValueModel
from posttrain.rollout.rollout import Rollout
from posttrain.rollout.scoring import RunningMoments, normalize_and_clip, penalize_missing_eos
from posttrain.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts_for(tokenizer, texts: list[str]) -> list[TokenizedPrompt]:
    out = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        out.append(TokenizedPrompt(tokenize_prompt(messages, tokenizer), messages, {"prompt": text, "id": i}, i))
    return out


def sample(model, tokenizer, texts, *, seed=0, temperature=1.0, max_new_tokens=12, stop_strings=()):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_strings=tuple(stop_strings),
                            seed=seed)
    return Sampler(model, tokenizer, precision="fp32").generate(prompts_for(tokenizer, texts), params)


def test_select_slices_every_field(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = sample(model, tokenizer, ["a", "b", "c"])
    b, a = gen.response_ids.shape
    per_token = {k: torch.randn(b, a) for k in ("logprobs", "ref_logprobs", "entropy", "values")}
    rollout = Rollout(**vars(gen), scores=torch.arange(3.0), raw_scores=torch.arange(3.0), **per_token)
    part = rollout.select(torch.tensor([2, 0]))
    assert part.prompts == ["c", "a"] and part.scores.tolist() == [2.0, 0.0]
    assert torch.equal(part.values, per_token["values"][[2, 0]])
    assert part.select(slice(1, 2)).prompts == ["a"]


def test_critic_from_reward_model_reads_its_score_at_the_last_token(tiny_path):
    rm = RewardModel.from_causal_lm(str(tiny_path), seed=3).eval()
    ids = torch.randint(3, 100, (2, 7))
    attention = torch.ones_like(ids)
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        values = ValueModel(rm)(ids, attention, positions)
        assert values.shape == (2, 7)
        torch.testing.assert_close(values[:, -1], rm(ids, attention))
        zero = ValueModel.from_causal_lm(str(tiny_path))(ids, attention, positions)
    assert (zero == 0).all()


def test_missing_eos_penalty_normalisation_and_clipping():
    raw, ended = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    assert penalize_missing_eos(raw, ended, 0.5).tolist() == [1.0, 1.5, 3.0]
    moments = RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 8.0])
    moments.update(a)
    moments.update(b)
    both = torch.cat([a, b])
    assert moments.mean == pytest.approx(float(both.mean())) and moments.std == pytest.approx(float(both.std()))
    # (x − 3) / std(=3.1623) for x = 8 → 1.58, clipped to 1.
    out = normalize_and_clip(torch.tensor([8.0, 3.0]), moments, 1.0)
    assert out.tolist() == pytest.approx([1.0, 0.0])
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std
