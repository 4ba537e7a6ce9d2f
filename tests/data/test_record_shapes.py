"""Record shapes: what each valid shape becomes, and one-line errors for every kind of bad record.

Error cases are written into a file after one good record, so each message must name that
file, record 2, the field and the offending value; with skip_invalid the same record is
counted under its reason instead.
"""

from __future__ import annotations

import json

import pytest

from posttrain.data import (
    PreferencePair,
    RecordError,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    preference_pairs,
    prompt_messages,
    sft_messages,
)

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


def sft(record):
    return sft_messages(record, source="d.jsonl", index=0)


def test_sft_shapes():
    assert sft({"prompt": "Hi", "completion": "Hello", "id": 7}) == [U("Hi"), A("Hello")]
    assert sft({"prompt": [S("Be brief."), U("Hi")], "completion": [A("Hello")]}) == [S("Be brief."), U("Hi"), A("Hello")]
    assert sft({"instruction": "Add", "input": "2 and 3", "output": "5"}) == [U("Add\n\n2 and 3"), A("5")]
    assert sft({"instruction": "Add", "input": "", "output": "5"}) == [U("Add"), A("5")]
    chat = [S("sys"), U("a"), A("b"), U("c"), A("d")]
    assert sft({"messages": chat}) == chat
    # A null field counts as absent: Parquet fills columns of the other shape with nulls.
    assert sft({"prompt": "Hi", "completion": "Hello", "messages": None}) == [U("Hi"), A("Hello")]


def test_preference_shapes():
    pair = preference_pairs({"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "margin": 2}, source="d", index=4)
    assert pair == [PreferencePair([U("Hi")], [A("Hello")], [A("Go")], 2.0, 4)]
    full = {"chosen": [U("Hi"), A("x"), U("More"), A("Hello")], "rejected": [U("Hi"), A("x"), U("More"), A("Go")]}
    (pair,) = preference_pairs(full, source="d", index=0)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([U("Hi"), A("x"), U("More")], [A("Hello")], [A("Go")])
    # ultrafeedback_binarized style: a prompt string repeated as the conversations' first turn.
    (pair,) = preference_pairs({"prompt": "Hi", "chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go")]},
                               source="d", index=0)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([U("Hi")], [A("Hello")], [A("Go")])


def scored(pairing, gap=0.0):
    record = {"prompt": "Q", "responses": ["a", "b", "c", "d"], "scores": [1.0, 3.0, 3.0, 2.5]}
    pairs = preference_pairs(record, source="d", index=0, pairing=pairing, min_score_gap=gap)
    return [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs]


def test_scored_pairing():
    # b and c tie at 3.0: no pair between them; best_vs_rest takes the first best, b.
    assert scored("all") == [("b", "a"), ("c", "a"), ("d", "a"), ("b", "d"), ("c", "d")]
    assert scored("best_vs_rest") == [("b", "a"), ("b", "d")]
    # Gaps: b-a 2.0, c-a 2.0, d-a 1.5, b-d 0.5, c-d 0.5; only > 1.5 passes.
    assert scored("all", gap=1.5) == [("b", "a"), ("c", "a")]
    assert scored("all", gap=5.0) == []


def test_prompt_shapes():
    assert prompt_messages({"prompt": "Hi", "answer": "42"}, source="d", index=0) == [U("Hi")]
    chat = [S("s"), U("a"), A("b"), U("c")]
    assert prompt_messages({"messages": chat}, source="d", index=0) == chat


# (record, field, value shown in the message, reason counted by skip_invalid)
SFT_ERRORS = [
    ({"prompt": "Hi"}, "completion", "['prompt']", "missing field 'completion'"),
    ({"prompt": "Hi", "completion": ""}, "completion", "''", "empty completion"),
    ({"prompt": "Hi", "completion": 42}, "completion", "number 42", "non-string completion"),
    ({"prompt": "", "completion": "x"}, "prompt", "''", "empty prompt"),
    ({"instruction": "Do", "output": "  "}, "output", "'  '", "empty output"),
    ({"instruction": "Do", "input": ["x"], "output": "y"}, "input", "list ['x']", "non-string input"),
    ({"input": "x", "output": "y"}, "instruction", "['input', 'output']", "missing field 'instruction'"),
    ({"text": "hello"}, "prompt", "['text']", "unknown record shape"),
    ({"prompt": "Hi", "completion": "x", "messages": [U("a"), A("b")]}, "messages", "'prompt'", "ambiguous record shape"),
    ({"messages": "Hi"}, "messages", "string 'Hi'", "non-list messages"),
    ({"messages": [U("a"), {"role": "tool", "content": "b"}]}, "messages[1].role", "'tool'", "unknown role"),
    ({"messages": [U("a"), {"role": "assistant", "content": 5}]}, "messages[1].content", "number 5", "non-string content"),
    ({"messages": [U("a"), A("")]}, "messages[1].content", "''", "empty content"),
    ({"messages": [U("a"), {"role": "assistant", "text": "b"}]}, "messages[1]", "['role', 'text']", "unexpected message key"),
    ({"messages": [U("a"), U("b")]}, "messages", "['user', 'user']", "no assistant turn"),
    ({"messages": [U("a"), A("b"), U("c")]}, "messages[2].role", "'user'", "conversation does not end with assistant"),
    ({"messages": [A("a"), U("b"), A("c")]}, "messages[0].role", "'assistant'", "conversation does not start with user"),
    ({"messages": [U("a"), S("b"), A("c")]}, "messages[1].role", "'system'", "system message not first"),
]

PAIR_ERRORS = [
    ({"chosen": "a", "rejected": "b"}, "prompt", "['chosen', 'rejected']", "missing field 'prompt'"),
    ({"prompt": "Q", "chosen": "a"}, "rejected", "['chosen', 'prompt']", "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "'same'", "chosen identical to rejected"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen", "''", "empty chosen"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "string 'big'", "non-numeric margin"),
    ({"prompt": "Q", "chosen": [U("a")], "rejected": "b"}, "rejected", "string 'b'",
     "chosen and rejected of different shapes"),
    ({"prompt": "Q", "chosen": [A("a"), U("x")], "rejected": "b"}, "chosen[1].role", "'user'",
     "non-assistant message in chosen"),
    ({"prompt": [U("Q"), A("x")], "chosen": "a", "rejected": "b"}, "prompt[1].role", "'assistant'",
     "prompt does not end with a user turn"),
    ({"chosen": [U("Q"), A("a")], "rejected": [U("R"), A("b")]}, "rejected", "'R'", "no shared prompt"),
    ({"chosen": [U("Q"), A("a"), U("x"), A("c")], "rejected": [U("Q"), A("b"), U("x"), A("d")]}, "chosen[1]",
     "'a'", "conversations differ before the reply"),
    ({"prompt": "Other", "chosen": [U("Q"), A("a")], "rejected": [U("Q"), A("b")]}, "prompt", "'Other'",
     "prompt does not match conversations"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1.0]}, "scores", "[1.0]", "responses/scores length mismatch"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [2, 2]}, "scores", "[2, 2]", "ties only"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, "high"]}, "scores[1]", "string 'high'", "non-numeric score"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, True]}, "scores[1]", "boolean True", "non-numeric score"),
    ({"prompt": "Q", "responses": ["a", "a"], "scores": [1, 2]}, "responses[1]", "'a'", "chosen identical to rejected"),
    ({"prompt": "Q", "responses": ["a", ""], "scores": [1, 2]}, "responses[1]", "''", "empty responses"),
    ({"prompt": "Q", "responses": ["a"], "scores": [1]}, "responses", "got 1", "fewer than 2 responses"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "responses": ["c"]}, "responses", "'chosen'",
     "ambiguous record shape"),
]

PROMPT_ERRORS = [
    ({"question": "Q"}, "prompt", "['question']", "unknown record shape"),
    ({"prompt": "   "}, "prompt", "'   '", "empty prompt"),
    # A zero-width space and a byte-order mark show nothing: as blank as spaces.
    ({"prompt": "\u200b \ufeff"}, "prompt", "'\\u200b \\ufeff'", "empty prompt"),
    ({"messages": [U("a"), A("b")]}, "messages[1].role", "'assistant'", "prompt does not end with a user turn"),
    ({"messages": [S("only")]}, "messages", "only a system message", "no user turn"),
]

GOOD = {
    "sft": {"prompt": "Hi", "completion": "Hello"},
    "pairs": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
    "prompts": {"prompt": "Hi"},
}


def load(kind, path, tokenizer, **kwargs):
    if kind == "sft":
        return load_sft_examples(path, tokenizer, max_length=64, **kwargs)
    if kind == "pairs":
        return load_preference_pairs(path, tokenizer, max_length=64, **kwargs)
    return load_prompts(path, tokenizer, max_prompt_length=64, **kwargs)


CASES = ([("sft", *case) for case in SFT_ERRORS] + [("pairs", *case) for case in PAIR_ERRORS]
         + [("prompts", *case) for case in PROMPT_ERRORS])


@pytest.mark.parametrize("kind, record, field, value, reason", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_bad_record(tmp_path, tiny_tokenizer, kind, record, field, value, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD[kind]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RecordError) as error:
        load(kind, path, tiny_tokenizer)
    message = str(error.value)
    assert message.startswith(f"{path}: record 2: field '{field}': "), message
    assert value in message and "\n" not in message
    assert error.value.reason == reason

    examples, report = load(kind, path, tiny_tokenizer, skip_invalid=True)
    assert len(examples) == 1 and report.invalid == {reason: 1}
    assert f"skipped 1 invalid ({reason}: 1)" in report.summary()


def test_long_values_are_shortened():
    with pytest.raises(RecordError) as error:
        sft({"prompt": "Hi", "completion": ["x" * 1000]})
    assert len(str(error.value)) < 200


def test_bad_options_are_programmer_errors():
    record = {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 2]}
    with pytest.raises(ValueError, match="pairing: expected one of"):
        preference_pairs(record, source="d", index=0, pairing="best")
    with pytest.raises(ValueError, match="min_score_gap: expected >= 0"):
        preference_pairs(record, source="d", index=0, min_score_gap=-1)
