"""Reward functions (`fn:module:function`) and the spec registry: today's contract, its checks,
and one-line errors naming the spec."""

from __future__ import annotations

import math
import re

import pytest
from scoring_helpers import generation

from posttrain.models.tiny import build_tiny_tokenizer
from posttrain.scoring import (FunctionScorer, ScoreError, call_reward_fn, load_reward_fn, load_scorer,
                               parse_spec, score_generation)

HERE = __name__


def lengths(prompts, responses):
    return [float(len(r)) for r in responses]


def with_records(prompts, responses, records):
    return [float(rec["id"]) + len(p) for p, rec in zip(prompts, records)]


def short(prompts, responses):
    return [0.0]


def nan_second(prompts, responses):
    return [0.0, math.nan][:len(responses)]


def boom(prompts, responses):
    return [1 / 0 for _ in responses]


def none(prompts, responses):
    return None


def scalar(prompts, responses):
    return 0.5


def text(prompts, responses):
    return "1.0"


def generated(prompts, responses):
    yield 1 / 0


def test_a_reward_function_is_called_with_last_user_turns_and_reply_texts():
    scorer = load_scorer(f"fn:{HERE}:with_records")
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "abc"}]
    # "abc" is the last user turn (3 characters) of the conversation; "q" has 1.
    assert scorer.score(["q", conversation], ["x", "y"], [{"id": 10}, {"id": 20}]) == [11.0, 23.0]
    assert load_scorer(f"fn:{HERE}:lengths").score(["p"], [[{"role": "assistant", "content": "ab"}]]) == [2.0]


def test_a_generation_is_scored_on_its_texts_with_its_prompts_records():
    tokenizer = build_tiny_tokenizer()
    gen = generation(tokenizer, [("a", "xyz", "eos"), ("bb", "q", "length")])
    scores = score_generation(FunctionScorer(with_records, "fn:t"), gen, [[{"role": "user", "content": "a"}],
                              [{"role": "user", "content": "bb"}]], [{"id": 1}, {"id": 2}], tokenizer=tokenizer)
    assert scores.tolist() == [2.0, 4.0]


def multiline(prompts, responses):
    raise RuntimeError("line one\nline two\n  line three")


NOT_A_FUNCTION = 5


def exits(prompts, responses):
    raise SystemExit(3)


def test_bad_reward_functions_fail_in_one_line_naming_the_spec():
    with pytest.raises(ValueError, match=r"^fn:t: returned 1 scores for 2 responses$"):
        call_reward_fn(short, "fn:t", ["a", "b"], ["c", "d"])
    with pytest.raises(ScoreError, match=r"^fn:t: score 1 is nan, expected a finite number$") as err:
        call_reward_fn(nan_second, "fn:t", ["a", "b"], ["c", "d"])
    assert err.value.row == 1
    with pytest.raises(ValueError, match=r"^fn:t: raised ZeroDivisionError: division by zero$"):
        call_reward_fn(boom, "fn:t", ["a"], ["c"])
    with pytest.raises(ValueError, match=r"^fn:t: raised ZeroDivisionError: division by zero$"):
        call_reward_fn(generated, "fn:t", ["a"], ["c"])     # failing while its result is read: still raised
    with pytest.raises(ValueError, match=r"^fn:t: raised RuntimeError: line one line two line three$"):
        call_reward_fn(multiline, "fn:t", ["a"], ["c"])      # every line of the message, folded
    with pytest.raises(ValueError, match=r"^fn:t: raised SystemExit: 3$"):
        call_reward_fn(exits, "fn:t", ["a"], ["c"])          # not the end of the whole run, silently
    with pytest.raises(ValueError, match="takes `records`, but this caller has no source records"):
        call_reward_fn(with_records, "fn:t", ["a"], ["c"])
    with pytest.raises(ValueError, match=r"fn:no_such_module_xyz:f: cannot import"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=f"fn:{HERE}:missing: module {HERE} has no function 'missing'"):
        load_scorer(f"fn:{HERE}:missing")
    with pytest.raises(ValueError, match=f"^fn:{HERE}:NOT_A_FUNCTION: {HERE}.NOT_A_FUNCTION is not a function \\(type int\\)$"):
        load_scorer(f"fn:{HERE}:NOT_A_FUNCTION")
    with pytest.raises(ScoreError, match=r"^fn:t: score 0 is 10{56}\.\.\., "
                                         r"expected a finite number within float32's ±3\.4e38$"):
        call_reward_fn(lambda p, r: [10 ** 400], "fn:t", ["a"], ["c"])   # not all 401 digits
    with pytest.raises(ScoreError, match=r"^fn:t: score 0 is an int of 16610 bits, expected a finite number"):
        call_reward_fn(lambda p, r: [10 ** 5000], "fn:t", ["a"], ["c"])  # beyond what repr() converts


@pytest.mark.parametrize("fn, returned", [(none, "None"), (scalar, "a float (0.5)"), (text, "a str (1.0)")])
def test_a_function_returning_no_list_is_told_so_not_said_to_raise(fn, returned):
    with pytest.raises(ValueError, match=rf"^fn:t: returned {re.escape(returned)}, expected a list of 2 numbers$"):
        call_reward_fn(fn, "fn:t", ["a", "b"], ["c", "d"])


def test_whitespace_around_a_spec_and_its_target_is_stripped():
    assert parse_spec(" fn: mod:f \n") == ("fn", "mod:f")
    scorer = load_scorer(f"fn:{HERE}:lengths ")
    assert scorer.spec == f"fn:{HERE}:lengths" and scorer.score(["p"], ["abc"]) == [3.0]
    assert load_reward_fn(f" {HERE} : lengths ") is lengths


@pytest.mark.parametrize("spec", ["xx:model", "rm", "model-without-kind", "rm:"])
def test_unknown_specs_list_every_kind(spec):
    with pytest.raises(ValueError, match=re.escape("unknown judge spec, expected one of rm:PATH | fn:module:function")):
        parse_spec(spec)


def test_pointwise_users_refuse_the_llm_judge_before_loading_it():
    with pytest.raises(ValueError, match="the LLM judge compares pairs of responses"):
        load_scorer("llm:no/such-model")
