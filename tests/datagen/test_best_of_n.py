"""`posttrain best-of-n`: the best reply per prompt or every reply above a threshold, cut-off
replies, ties, bad records and empty selections on hand-made scored files; `posttrain judge
--keep-all`; and the chain sample → judge → best-of-n → sft on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data import load_sft_examples, sft_messages
from posttrain.datagen import ranks
from posttrain.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __name__
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path: Path, records: list, *flags: str) -> tuple[int, list[dict] | None]:
    """Exit code of `posttrain best-of-n` on `records`, and the records it wrote (None: no file)."""
    data, out = write_jsonl(tmp_path / "scored.jsonl", records), tmp_path / "sft.jsonl"
    code = main(["best-of-n", "--data", str(data), "--output", str(out), *flags])
    return code, read_jsonl(out) if out.exists() else None


SCORED = [
    {"prompt": "Q0", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5], "id": 7},
    # A chat prompt, and a tie for the best: the first of the two wins.
    {"prompt": CHAT, "responses": ["hi", "hello", "hey"], "scores": [2.0, 3.0, 3.0], "finish_reasons": ["eos"] * 3},
    # The best reply was cut off at max_new_tokens: the next best is chosen, and its rank says so.
    {"prompt": "Q2", "responses": ["long and unfin", "ok", "no"], "scores": [5.0, 4.0, -1.0],
     "finish_reasons": ["length", "eos", "stop"]},
    # One reply (what --keep-all lets through), and equal scores: still a best.
    {"prompt": "Q3", "responses": ["only"], "scores": [0.0]},
    {"prompt": "Q4", "responses": ["x", "y"], "scores": [1.0, 1.0]},
]


def test_ranks_put_equal_scores_in_record_order():
    assert ranks([1.0, 3.0, 3.0, 0.0]) == [3, 1, 2, 4]
    assert ranks([-2.0]) == [1]


def test_the_best_reply_per_record_with_its_provenance(tmp_path, capsys):
    code, rows = run(tmp_path, SCORED)
    assert code == 0
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        ("Q0", "b"), (CHAT, "hello"), ("Q2", "ok"), ("Q3", "only"), ("Q4", "x")]
    assert [r["best_of_n"] for r in rows] == [
        {"score": 0.9, "rank": 1, "source_index": 0, "response_index": 1},
        {"score": 3.0, "rank": 1, "source_index": 1, "response_index": 1},
        {"score": 4.0, "rank": 2, "source_index": 2, "response_index": 1},
        {"score": 0.0, "rank": 1, "source_index": 3, "response_index": 0},
        {"score": 1.0, "rank": 1, "source_index": 4, "response_index": 0}]
    assert set(rows[0]) == {"prompt", "completion", "best_of_n"}      # no source fields carried over
    for i, row in enumerate(rows):                                      # each one an SFT record
        assert sft_messages(row, source="sft.jsonl", index=i)[-1] == {"role": "assistant", "content": row["completion"]}
    # 12 replies, mean (0.1 + 0.9 + 0.5 + 2 + 3 + 3 + 5 + 4 − 1 + 0 + 1 + 1) / 12 = 19.5 / 12 = 1.625;
    # selected (0.9 + 3 + 4 + 0 + 1) / 5 = 1.78.
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"read 5 records (12 responses, mean score 1.625); wrote 5 SFT records to {tmp_path / 'sft.jsonl'} "
                    "(mean score 1.78); left out 6 not the best, 1 cut off at max_new_tokens")


def test_threshold_keeps_every_distinct_reply_at_or_above_it(tmp_path, capsys):
    records = [{"prompt": "Q0", "responses": ["95", "95", "94", "ninety-five"], "scores": [1.0, 1.0, 0.0, 1.0]},
               {"prompt": "Q1", "responses": ["3", "4"], "scores": [0.0, 0.0]},
               {"prompt": "Q2", "responses": ["7", "7 and more"], "scores": [1.0, 1.0], "finish_reasons": ["eos", "length"]}]
    code, rows = run(tmp_path, records, "--threshold", "1")
    assert code == 0
    assert [(r["prompt"], r["completion"], r["best_of_n"]["rank"]) for r in rows] == [
        ("Q0", "95", 1), ("Q0", "ninety-five", 3), ("Q2", "7", 1)]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("left out 3 below the threshold 1, 1 duplicates, 1 cut off at max_new_tokens; "
                         "1 records gave none (1 with no reply scoring ≥ 1)")
    code, rows = run(tmp_path, records, "--threshold", "1", "--keep-cut-off")
    assert [r["completion"] for r in rows] == ["95", "ninety-five", "7", "7 and more"]


def test_cut_off_replies_are_left_out_unless_asked_for(tmp_path, capsys):
    records = [{"prompt": "Q0", "responses": ["cut", "also cut"], "scores": [1.0, 0.0],
                "finish_reasons": ["length", "length"]},
               {"prompt": "Q1", "responses": ["done", "cut"], "scores": [0.0, 1.0], "finish_reasons": ["stop", "length"]}]
    code, rows = run(tmp_path, records)
    assert code == 0 and [r["completion"] for r in rows] == ["done"]
    assert capsys.readouterr().out.strip().endswith(
        "left out 3 cut off at max_new_tokens; 1 records gave none (1 with every reply cut off)")
    code, rows = run(tmp_path, records, "--keep-cut-off")
    assert [r["completion"] for r in rows] == ["cut", "cut"]


def test_min_gap_leaves_out_records_whose_scores_hardly_differ(tmp_path, capsys):
    # Spreads: 0.8, 1.0 (= the gap: kept), 0, 0.
    code, rows = run(tmp_path, SCORED[:2] + SCORED[3:], "--min-gap", "1")
    assert code == 0 and [r["completion"] for r in rows] == ["hello"]
    assert capsys.readouterr().out.strip().endswith("3 records gave none (3 with scores within the gap 1)")


def test_nothing_selected_is_an_error_and_writes_no_file(tmp_path, capsys):
    records = [{"prompt": "Q0", "responses": ["a", "b"], "scores": [0.0, 0.5]},
               {"prompt": "Q1", "responses": ["c"], "scores": [1.0], "finish_reasons": ["length"]}]
    code, rows = run(tmp_path, records, "--threshold", "0.9")
    assert code == 2 and rows is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"posttrain best-of-n: error: {tmp_path / 'scored.jsonl'}: no reply selected from its 2 records "
                   f"(1 with no reply scoring ≥ 0.9, 1 with every reply cut off); {tmp_path / 'sft.jsonl'} not written"]


@pytest.mark.parametrize("record, field, problem", [
    ({"responses": ["a"], "scores": [1]}, "prompt", "missing (record has fields ['responses', 'scores'])"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "responses": ["a"], "scores": [1]}, "prompt[0].role",
     "expected the first turn to be 'user'"),
    ({"prompt": "Q", "responses": "a", "scores": [1]}, "responses", "expected a list, got string 'a'"),
    ({"prompt": "Q", "responses": [], "scores": []}, "responses", "expected at least 1 response, got 0"),
    ({"prompt": "Q", "responses": ["a", " "], "scores": [1, 2]}, "responses[1]", "expected a non-empty string"),
    ({"prompt": "Q", "responses": ["a", 3], "scores": [1, 2]}, "responses[1]", "expected a string or a list of messages"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, "scores", "expected 2 scores, one per response, got 1"),
    ({"prompt": "Q", "responses": ["a"], "scores": ["high"]}, "scores[0]", "expected a finite number, got string"),
    ({"prompt": "Q", "responses": ["a"], "scores": [1], "finish_reasons": ["max_tokens"]}, "finish_reasons[0]",
     "expected one of ['eos', 'stop', 'length'], got 'max_tokens'"),
])
def test_a_bad_record_stops_with_one_line_and_no_file(tmp_path, capsys, record, field, problem):
    code, rows = run(tmp_path, [SCORED[0], record])
    assert code == 2 and rows is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"posttrain best-of-n: error: {tmp_path / 'scored.jsonl'}: record 2: field '{field}': "
                             f"{problem}")


@pytest.mark.parametrize("flags, message", [
    (["--min-gap", "-1"], "--min-gap=-1.0: expected a finite number ≥ 0"),
    (["--threshold", "nan"], "--threshold=nan: expected a finite number"),
])
def test_bad_options(tmp_path, capsys, flags, message):
    assert run(tmp_path, SCORED, *flags) == (2, None)
    assert capsys.readouterr().err.strip() == f"posttrain best-of-n: error: {message}"


def test_the_output_may_not_be_the_input(tmp_path, capsys):
    data = write_jsonl(tmp_path / "scored.jsonl", SCORED)
    assert main(["best-of-n", "--data", str(data), "--output", str(data)]) == 2
    assert "is the input file itself" in capsys.readouterr().err and read_jsonl(data) == SCORED


def lengths(prompts, responses):
    return [float(len(r)) for r in responses]


def ones(prompts, responses):
    return [1.0] * len(responses)


def test_judge_keep_all_writes_the_records_that_form_no_pair(tmp_path, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "responses": ["xy", "z"]},
                                              {"prompt": "b", "responses": ["same", "more"]},
                                              {"prompt": "c", "responses": ["only", ""]},
                                              {"prompt": "d", "responses": ["", " "]}])
    out = tmp_path / "scored.jsonl"
    assert main(["judge", "--data", str(data), "--judge", f"fn:{HERE}:ones", "--keep-all", "--output", str(out)]) == 0
    assert [(r["prompt"], r["responses"], r["scores"]) for r in read_jsonl(out)] == [
        ("a", ["xy", "z"], [1.0, 1.0]), ("b", ["same", "more"], [1.0, 1.0]), ("c", ["only"], [1.0])]
    assert capsys.readouterr().out.strip().endswith(
        f"mean score 1; wrote 3 scored lists to {out}; left out 1 records with no non-empty response")
    assert main(["judge", "--data", str(data), "--judge", "llm:tiny-random", "--keep-all", "--output", str(out)]) == 2
    assert "--keep-all: only for an rm: or fn: judge" in capsys.readouterr().err


# The tiny model's replies mostly run to max_new_tokens; seed 2 was picked for its 4 finished ones.
SAMPLE_ARGS = ["--model", "tiny-random", "--n", "4", "--max-new-tokens", "8", "--precision", "fp32", "--seed", "2"]


def test_sample_judge_best_of_n_then_sft_reads_it(tmp_path, capsys):
    prompts = [{"prompt": f"question number {i}", "id": i} for i in range(6)]
    prompts[5] = {"messages": [{"role": "user", "content": "a chat question"}]}
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    samples, scored, sft = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl", tmp_path / "sft.jsonl"
    assert main(["sample", "--data", str(data), "--output", str(samples), *SAMPLE_ARGS]) == 0
    assert main(["judge", "--data", str(samples), "--judge", f"fn:{HERE}:lengths", "--keep-all",
                 "--output", str(scored)]) == 0
    assert main(["best-of-n", "--data", str(scored), "--output", str(sft)]) == 0
    judged, rows = read_jsonl(scored), read_jsonl(sft)
    # What the selection should be, worked out here: the longest finished reply, the first of equals.
    want = []
    for index, record in enumerate(judged):
        finished = [i for i, why in enumerate(record["finish_reasons"]) if why != "length"]
        if finished:
            best = max(finished, key=lambda i: (record["scores"][i], -i))
            want.append((record["prompt"], record["responses"][best], index))
    assert len(want) >= 2, "under two finished replies: pick another seed"
    assert [(r["prompt"], r["completion"], r["best_of_n"]["source_index"]) for r in rows] == want
    out = tmp_path / "model"
    assert main(["sft", "--model", "tiny-random", "--data", str(sft), "--max-steps", "2", "--batch-size", "2",
                 "--precision", "fp32", "--output-dir", str(out)]) == 0
    examples, report = load_sft_examples(sft, build_tiny_tokenizer(), max_length=512)
    assert report.loaded == len(rows) and (out / "config.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in key for m in metrics for key in m)
