"""Sample records (what `posttrain sample` writes, `posttrain judge` reads) and records to score
(`posttrain score`): what each valid one becomes, and one-line errors naming file, record, field."""

from __future__ import annotations

import pytest

from posttrain.data import RecordError, SampledResponses, sampled_responses, scoring_conversation

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def parse(record, min_responses=1):
    return sampled_responses(record, source="s.jsonl", index=1, min_responses=min_responses)


def test_sample_record_shapes():
    assert parse({"prompt": "Q", "responses": ["a", "b"], "sampling": {"n": 2}}) == SampledResponses(
        [U("Q")], ["a", "b"], ["eos", "eos"])
    assert parse({"messages": [U("Q")], "responses": ["a"], "finish_reasons": ["length"]}) == SampledResponses(
        [U("Q")], ["a"], ["length"])
    # A chat prompt record the sampler also gave a "prompt": both must say the same.
    assert parse({"messages": [U("Q")], "prompt": [U("Q")], "responses": ["a"]}).prompt == [U("Q")]
    # A model may emit EOS at once: an empty or whitespace-only reply is still a sample.
    assert parse({"prompt": "Q", "responses": ["", " \n", "a"]}).responses == ["", " \n", "a"]


@pytest.mark.parametrize("record, min_responses, field, problem", [
    ({"prompt": "Q", "responses": "a"}, 1, "responses", "expected a list of strings, got string 'a'"),
    ({"prompt": "Q", "responses": []}, 1, "responses", "expected at least 1 responses, got 0"),
    ({"prompt": "Q", "responses": ["a"]}, 2, "responses", "expected at least 2 responses, got 1"),
    ({"prompt": "Q", "responses": ["a", 3]}, 1, "responses[1]", "expected a string, got number 3"),
    ({"prompt": "Q", "responses": ["a"], "finish_reasons": ["eos", "eos"]}, 1, "finish_reasons",
     "expected a list of 1 values, one per response"),
    ({"prompt": "Q", "responses": ["a"], "finish_reasons": ["max_tokens"]}, 1, "finish_reasons[0]",
     "expected one of ['eos', 'stop', 'length'], got 'max_tokens'"),
    ({"responses": ["a"]}, 1, "prompt", "expected the fields of one record shape ({prompt} | {messages})"),
    ({"prompt": [A("x")], "responses": ["a"]}, 1, "prompt[0].role", "expected the first turn to be 'user'"),
    ({"prompt": "Q", "messages": [U("R")], "responses": ["a"]}, 1, "messages",
     "expected the conversation 'prompt' holds"),
])
def test_bad_sample_records(record, min_responses, field, problem):
    with pytest.raises(RecordError, match="^s.jsonl: record 2: ") as err:
        parse(record, min_responses)
    assert err.value.field == field and problem in str(err.value) and "\n" not in str(err.value)


def test_scoring_records():
    assert scoring_conversation({"prompt": "Q", "response": "a"}, source="d", index=0) == ([U("Q")], [A("a")])
    chat = [U("Q"), A("a"), U("R"), A("b"), A("c")]
    assert scoring_conversation({"messages": chat}, source="d", index=0) == (chat[:3], chat[3:])
    with pytest.raises(RecordError, match="^d: record 1: field 'response': missing"):
        scoring_conversation({"prompt": "Q"}, source="d", index=0)
