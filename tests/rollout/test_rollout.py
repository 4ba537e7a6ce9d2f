"""Rollouts: stop masks, sampler-consistent log-probs, padding invariance, scoring paths."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.models.reward import RewardModel
from posttrain.models.value import ValueModel, response_logprobs
from posttrain.rollout.rollout import Generation, Rollout, generate_rollouts, response_masks, sampling_config
from posttrain.rollout.scoring import (RunningMoments, call_reward_fn, load_reward_fn, normalize_and_clip,
                                       penalize_missing_eos, reward_model_scores, same_tokenization)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to share: a second thread only waits for the
    first, and on a busy machine that wait dominates (about 7× slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_for(tokenizer, texts: list[str]) -> list[TokenizedPrompt]:
    out = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        out.append(TokenizedPrompt(tokenize_prompt(messages, tokenizer), messages, {"prompt": text, "id": i}, i))
    return out


def sample(model, tokenizer, texts, *, seed=0, temperature=1.0, max_new_tokens=12, stop_strings=()):
    torch.manual_seed(seed)
    config = sampling_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                             stop_strings=list(stop_strings))
    return generate_rollouts(model.eval(), tokenizer, prompts_for(tokenizer, texts), list(range(len(texts))),
                             generation=config)


def test_masks_run_to_the_first_eos_or_stop_string_inclusive(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    rows = torch.tensor([ids("ab") + [eos] + ids("cd"),      # EOS at 2
                         ids("x;yz") + [eos],                # stop string ";" at 1, before EOS
                         ids("hello")])                      # truncated
    mask, ended = response_masks(rows, tiny_tokenizer, [";"])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    mask, ended = response_masks(rows, tiny_tokenizer, [])
    assert mask.sum(-1).tolist() == [3, 5, 5] and ended.tolist() == [True, True, False]


def test_generation_fields_and_stop_strings(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = sample(model, tokenizer, ["hi", "a longer prompt", "x"], stop_strings=["e", "o"])
    b, q = gen.query_ids.shape
    a = gen.response_ids.shape[1]
    assert (b, a) == gen.response_mask.shape and gen.query_mask.shape == (b, q)
    assert gen.query_mask[:, -1].all() and not gen.query_mask[:, 0].all()   # left-padded
    for text, ended, n in zip(gen.responses, gen.ended.tolist(), gen.response_mask.sum(-1).tolist()):
        stopped_by_string = text.endswith(("e", "o"))
        assert "e" not in text[:-1] and "o" not in text[:-1]
        assert ended or (n == a and not stopped_by_string)
    assert gen.prompts == ["hi", "a longer prompt", "x"]


def test_recomputed_logprobs_equal_the_samplers(tiny_model_and_tokenizer):
    # The sampler draws from softmax(logits / τ); PPO's log π_old is recomputed by a forward
    # pass of the same network with the same scaling, and must match it token for token.
    model, tokenizer = tiny_model_and_tokenizer
    texts, tau = ["hi", "a longer prompt", "xyz"], 0.7
    gen = sample(model, tokenizer, texts, temperature=tau)
    torch.manual_seed(0)
    config = sampling_config(tokenizer, max_new_tokens=12, temperature=tau, top_p=1.0, stop_strings=[])
    out = model.generate(input_ids=gen.query_ids, attention_mask=gen.query_mask.long(), generation_config=config,
                         output_scores=True, return_dict_in_generate=True)
    sampled = out.sequences[:, gen.query_ids.shape[1]:]
    assert torch.equal(sampled, gen.response_ids)
    sampler = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ours, entropy, _ = response_logprobs(model, *gen.sequences(), gen.response_mask, temperature=tau,
                                             with_entropy=True)
    mask = gen.response_mask
    torch.testing.assert_close(ours[mask], sampler[mask], atol=1e-4, rtol=1e-4)
    assert (ours[~mask] == 0).all() and (entropy[mask] > 0).all()


def test_a_rollout_computes_the_same_alone_as_in_a_padded_batch(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = sample(model, tokenizer, ["hi", "a much longer prompt than that"])
    with torch.no_grad():
        batch, _, _ = response_logprobs(model, *gen.sequences(), gen.response_mask, temperature=1.0,
                                        with_entropy=False)
        for row in range(2):
            n = int(gen.query_mask[row].sum())
            one = Generation(gen.query_ids[row:row + 1, -n:], gen.query_mask[row:row + 1, -n:],
                             gen.response_ids[row:row + 1], gen.response_mask[row:row + 1], gen.ended[row:row + 1],
                             gen.prompt_index[row:row + 1], gen.prompts[row:row + 1], gen.responses[row:row + 1])
            alone, _, _ = response_logprobs(model, *one.sequences(), one.response_mask, temperature=1.0,
                                            with_entropy=False)
            torch.testing.assert_close(alone[0], batch[row], atol=1e-5, rtol=1e-5)


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


def test_reward_model_scores_rollout_ids_as_it_scores_text(tiny_model_and_tokenizer, tiny_path):
    # Same tokenizer: the rollout's ids are scored directly; the text path re-renders
    # prompt + reply with the RM's template. Both read the score at the reply's EOS.
    model, tokenizer = tiny_model_and_tokenizer
    rm = RewardModel.from_causal_lm(str(tiny_path), seed=1).eval()
    assert same_tokenization(rm.tokenizer, tokenizer)
    gen = sample(model, tokenizer, [f"prompt {i}" for i in range(16)], max_new_tokens=60)
    # Rows that end in EOS and hold no other special token (<unk> would not survive decoding).
    special = (gen.response_ids <= tokenizer.eos_token_id) & gen.response_mask
    comparable = gen.ended & (special.sum(-1) == 1)
    assert comparable.any()
    prompts = prompts_for(tokenizer, gen.prompts)
    from_ids = reward_model_scores(rm, gen, prompts, reuse_ids=True, batch_size=3, device="cpu")
    from_text = reward_model_scores(rm, gen, prompts, reuse_ids=False, batch_size=3, device="cpu")
    torch.testing.assert_close(from_ids[comparable], from_text[comparable], atol=1e-5, rtol=1e-5)


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


def ok_fn(prompts, responses):
    return [float(len(r)) for r in responses]


def fn_with_records(prompts, responses, records):
    return [float(rec["id"]) for rec in records]


def short_fn(prompts, responses):
    return [0.0]


def nan_fn(prompts, responses):
    return [math.nan] * len(responses)


def test_reward_functions_are_called_and_checked(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = sample(model, tokenizer, ["a", "b"])
    prompts = prompts_for(tokenizer, ["a", "b"])
    here = __name__
    scores = call_reward_fn(load_reward_fn(f"{here}:ok_fn"), "ok", gen, prompts)
    assert scores.tolist() == [float(len(r)) for r in gen.responses]
    assert call_reward_fn(load_reward_fn(f"{here}:fn_with_records"), "r", gen, prompts).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        call_reward_fn(short_fn, "short", gen, prompts)
    with pytest.raises(ValueError, match="score 0 is nan"):
        call_reward_fn(nan_fn, "nan", gen, prompts)
    with pytest.raises(ValueError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward_fn(f"{here}:missing")
