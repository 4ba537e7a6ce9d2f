"""Loaders: validate everything first, then tokenize; length limits; one-line reports."""

from __future__ import annotations

import json

import pytest

import posttrain.data.load as load_module
from posttrain.data import DataError, RecordError, load_preference_pairs, load_prompts, load_sft_examples


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_summary_counts_everything(tmp_path, tiny_tokenizer):
    # Character-level tokens: "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"
    # is 6 + len(prompt) + 13 tokens, then the completion, <|im_end|> and "\n".
    rows = [{"prompt": "p", "completion": "c"}] * 5
    rows += [{"prompt": "p", "completion": "x" * 40}] * 3  # 62 tokens: truncated to 32
    rows += [{"prompt": "p" * 40, "completion": "c"}]  # loss starts at token 59: nothing left in 32
    rows += [{"prompt": "p"}, {"prompt": "p", "completion": ""}, {"prompt": "p", "completion": " "}]
    path = write(tmp_path / "f.jsonl", rows)
    examples, report = load_sft_examples(path, tiny_tokenizer, max_length=32, skip_invalid=True)
    assert len(examples) == 8 and all(len(e.input_ids) <= 32 and any(e.loss_mask) for e in examples)
    assert report.summary() == (
        f"loaded 8 records from {path}; skipped 3 invalid (empty completion: 2, missing field 'completion': 1); "
        "truncated 3 longer than 32 tokens; dropped 1 (no loss token in the first 32 tokens: 1)"
    )
    kept = examples[5]
    assert kept.input_ids[:32] == kept.input_ids and tiny_tokenizer.decode(kept.input_ids).startswith("<|im_start|>user")

    _, report = load_sft_examples(path, tiny_tokenizer, max_length=32, overlong="drop", skip_invalid=True)
    assert report.loaded == 5 and report.dropped == {"longer than 32 tokens": 4}


def test_every_record_is_validated_before_any_is_tokenized(tmp_path, tiny_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(load_module, "tokenize_conversation", lambda *a, **k: calls.append(a))
    path = write(tmp_path / "f.jsonl", [{"prompt": "p", "completion": "c"}] * 50 + [{"prompt": "p"}])
    with pytest.raises(RecordError, match="record 51: field 'completion'"):
        load_sft_examples(path, tiny_tokenizer, max_length=64)
    assert calls == []


def test_no_valid_records(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "f.jsonl", [{"prompt": "p"}, {"text": "t"}])
    with pytest.raises(DataError, match=r"f\.jsonl: no valid records; skipped 2 invalid \(missing field "
                                            r"'completion': 1, unknown record shape: 1\)"):
        load_sft_examples(path, tiny_tokenizer, max_length=64, skip_invalid=True)


def test_nothing_left_after_length_limits(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "f.jsonl", [{"prompt": "p" * 50, "completion": "c"}])
    with pytest.raises(DataError, match=r"f\.jsonl: no records left after length limits"):
        load_sft_examples(path, tiny_tokenizer, max_length=32, overlong="drop")


def test_bad_options(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "f.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="overlong: expected one of"):
        load_sft_examples(path, tiny_tokenizer, max_length=64, overlong="cut")
    with pytest.raises(ValueError, match="max_length: expected at least 2"):
        load_sft_examples(path, tiny_tokenizer, max_length=1)


def test_preference_loader(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 2, 4]},  # gaps a-b 1, a-c 3, b-c 2: 2 pairs
        {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 1.5]},  # gap 0.5 <= 1: no pair
        {"prompt": "Q", "chosen": "y", "rejected": "n", "margin": 0.5},
        # Differ only after 40 shared characters: identical once cut to 40 tokens.
        {"prompt": "Q", "chosen": "s" * 40 + "yes", "rejected": "s" * 40 + "no"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
    ]
    path = write(tmp_path / "p.jsonl", rows)
    pairs, report = load_preference_pairs(path, tiny_tokenizer, max_length=40, min_score_gap=1.0, skip_invalid=True)
    decoded = [(tiny_tokenizer.decode(p.chosen_ids), tiny_tokenizer.decode(p.rejected_ids)) for p in pairs]
    assert decoded == [("c<|im_end|>", "a<|im_end|>"), ("c<|im_end|>", "b<|im_end|>"), ("y<|im_end|>", "n<|im_end|>")]
    assert [p.margin for p in pairs] == [None, None, 0.5] and [p.source_index for p in pairs] == [0, 0, 2]
    assert report.summary() == (
        f"loaded 3 pairs from {path} (5 records); skipped 1 invalid (chosen identical to rejected: 1); "
        "dropped 2 (no pair with a score gap > 1: 1, identical in the first 40 tokens: 1)"
    )


def test_prompt_loader_keeps_the_record_and_drops_long_prompts(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "x" * 100}]
    prompts, report = load_prompts(write(tmp_path / "q.jsonl", rows), tiny_tokenizer, max_prompt_length=40)
    (prompt,) = prompts
    assert tiny_tokenizer.decode(prompt.input_ids).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert (prompt.record["answer"], prompt.source_index) == ("4", 0)
    assert report.dropped == {"longer than 40 tokens": 1}


def test_skip_invalid_skips_lines_that_hold_no_record_and_keeps_the_others_numbers(tmp_path, tiny_tokenizer):
    path = tmp_path / "f.jsonl"
    lines = [b'{"prompt": "p", "completion": "c"}', b'{"prompt": "p", "completion": ', b"[1, 2]",
             b'{"prompt": "\xff"}', b"", b'{"prompt": "p"}', b'{"prompt": "q", "completion": "d"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"f\.jsonl: not valid JSON lines \(line 2: Expecting value at column \d+\)$"):
        load_sft_examples(path, tiny_tokenizer, max_length=64)
    examples, report = load_sft_examples(path, tiny_tokenizer, max_length=64, skip_invalid=True)
    assert report.summary() == (f"loaded 2 records from {path}; skipped 4 invalid (invalid JSON: 1, not a JSON "
                                "object: 1, not UTF-8: 1, missing field 'completion': 1)")
    assert len(examples) == 2
    prompts, _ = load_prompts(path, tiny_tokenizer, max_prompt_length=64, skip_invalid=True)
    # Records count as before (blank lines not): the last is record 6, its index 5.
    assert [p.source_index for p in prompts] == [0, 4, 5]
    with pytest.raises(DataError, match="no valid records; skipped 2 invalid"):
        (tmp_path / "bad.jsonl").write_text("{\n[]\n")
        load_sft_examples(tmp_path / "bad.jsonl", tiny_tokenizer, max_length=64, skip_invalid=True)
