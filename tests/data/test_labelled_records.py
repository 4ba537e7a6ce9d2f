"""Labelled completions (KTO's unpaired feedback): the shapes, pairs split into both labels,
one-line errors, CSV labels, and the loader's tokenising, lengths and report."""

from __future__ import annotations

import json

import pytest

from posttrain.data import (
    DataError,
    LabelledCompletion,
    RecordError,
    labelled_completions,
    load_labelled_completions,
    read_records,
    tokenize_completion,
    tokenize_pair,
)
from posttrain.data.formats import PreferencePair

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


def labelled(record, **kwargs):
    return labelled_completions(record, source="d.jsonl", index=4, **kwargs)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unpaired_shapes():
    assert labelled({"prompt": "Hi", "completion": "Hello", "label": True, "id": 3}) == [
        LabelledCompletion([U("Hi")], [A("Hello")], True, 4)]
    chat = labelled({"prompt": [S("Be brief."), U("Hi")], "completion": [A("Hel"), A("lo")], "label": False})
    assert chat == [LabelledCompletion([S("Be brief."), U("Hi")], [A("Hel"), A("lo")], False, 4)]


def test_pairs_become_one_desirable_and_one_undesirable_example():
    assert labelled({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2}) == [
        LabelledCompletion([U("Q")], [A("good")], True, 4), LabelledCompletion([U("Q")], [A("bad")], False, 4)]
    conversations = {"chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")]}
    assert [(e.completion, e.label) for e in labelled(conversations)] == [([A("good")], True), ([A("bad")], False)]
    # Scored lists expand into pairs as for DPO, then each pair into its two examples.
    scored = {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [3, 1, 2]}
    assert [(e.completion[0]["content"], e.label) for e in labelled(scored, pairing="best_vs_rest")] == [
        ("a", True), ("b", False), ("a", True), ("c", False)]
    assert labelled(scored, min_score_gap=5) == []


@pytest.mark.parametrize("record, field, problem, reason", [
    ({"prompt": "Q", "completion": "A", "label": "true"}, "label", "expected true or false, got string 'true'",
     "non-boolean label"),
    ({"prompt": "Q", "completion": "A", "label": 1}, "label", "expected true or false, got number 1",
     "non-boolean label"),
    ({"prompt": "Q", "completion": "A"}, "label", "missing (record has fields ['completion', 'prompt'])",
     "missing field 'label'"),
    ({"prompt": "Q", "completion": "A", "label": None}, "label", "missing", "missing field 'label'"),
    ({"prompt": "Q", "completion": "", "label": True}, "completion", "expected a non-empty string, got ''",
     "empty completion"),
    ({"prompt": [A("x")], "completion": "A", "label": True}, "prompt[0].role",
     "expected the first turn to be 'user', got 'assistant'", "conversation does not start with user"),
    ({"completion": "A", "label": True}, "prompt", "missing", "missing field 'prompt'"),
    ({"prompt": "Q", "completion": "A", "chosen": "B", "label": True}, "chosen",
     "expected the fields of one record shape, got unpaired field 'completion' together with pair field 'chosen'",
     "ambiguous record shape"),
    ({"prompt": "Q", "chosen": "B", "rejected": "B"}, "rejected", "expected a response different from 'chosen'",
     "chosen identical to rejected"),
    ({"prompt": "Q"}, "completion", "expected the fields of one record shape ({prompt, completion, label} | ",
     "unknown record shape"),
])
def test_bad_record(tmp_path, tiny_tokenizer, record, field, problem, reason):
    path = write(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A", "label": True}, record])
    with pytest.raises(RecordError) as error:
        load_labelled_completions(path, tiny_tokenizer, max_length=64)
    message = str(error.value)
    assert message.startswith(f"{path}: record 2: field '{field}': {problem}"), message
    assert "\n" not in message and error.value.reason == reason

    examples, report = load_labelled_completions(path, tiny_tokenizer, max_length=64, skip_invalid=True)
    assert len(examples) == 1 and report.invalid == {reason: 1}


def test_csv_labels_are_booleans(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nQ,A,true\nQ2,B,FALSE\nQ3,C,\n")
    assert [r["label"] for r in read_records(path)] == [True, False, None]
    path.write_text("prompt,completion,label\nQ,A,yes\n")
    with pytest.raises(DataError, match=r"d\.csv: record 1: field 'label': expected true or false, got 'yes'"):
        read_records(path)


def test_tokenized_like_the_chosen_reply_of_a_pair(tiny_tokenizer):
    example = LabelledCompletion([U("p" * 10)], [A("c" * 30)], True, 0)
    as_pair = PreferencePair(example.prompt, example.completion, example.completion, None, 0)
    for max_length in (None, 64, 32):
        tokenized = tokenize_completion(example, tiny_tokenizer, max_length=max_length)
        pair = tokenize_pair(as_pair, tiny_tokenizer, max_length=max_length)
        assert (tokenized.prompt_ids, tokenized.completion_ids) == (pair.prompt_ids, pair.chosen_ids)
        assert tokenized.label is True and tokenized.length <= (max_length or 10_000)


def test_loader_counts_examples_and_length_limits(tmp_path, tiny_tokenizer):
    # Character-level tokens: a prompt "p" renders as 6 + 1 + 13 = 20 tokens, a reply "c" as
    # c + <|im_end|> = 2, so 30 c's make a 51-token example (longer than 32).
    rows = [{"prompt": "p", "completion": "c", "label": True},
            {"prompt": "p", "chosen": "c", "rejected": "d"},
            {"prompt": "p", "completion": "c" * 30, "label": False},
            {"prompt": "p", "responses": ["a", "b"], "scores": [1, 1.5]}]
    path = write(tmp_path / "f.jsonl", rows)
    examples, report = load_labelled_completions(path, tiny_tokenizer, max_length=32)
    assert [e.label for e in examples] == [True, True, False, False, True, False]
    assert [e.source_index for e in examples] == [0, 1, 1, 2, 3, 3]
    assert all(e.length <= 32 for e in examples) and examples[3].completion_ids[-1] != tiny_tokenizer.eos_token_id
    assert report.summary() == f"loaded 6 examples from {path} (4 records); truncated 1 longer than 32 tokens"

    examples, report = load_labelled_completions(path, tiny_tokenizer, max_length=32, overlong="drop",
                                                 min_score_gap=1)
    assert report.summary() == (f"loaded 3 examples from {path} (4 records); dropped 2 (longer than 32 tokens: 1, "
                                "no pair with a score gap > 1: 1)")
    with pytest.raises(DataError, match="no examples left after length limits"):
        load_labelled_completions(write(tmp_path / "g.jsonl", rows[2:3]), tiny_tokenizer, max_length=32,
                                  overlong="drop")
