"""`posttrain judge` and `posttrain score` end to end on the tiny model: outputs that `posttrain
rm` / `dpo` load unchanged, judging what `posttrain sample` wrote (empty replies included), and
every bad input of the issue stopping with one line, exit code 2 and no output file."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest
from scoring_helpers import SAMPLES, read_jsonl, write_jsonl

from posttrain.cli import build_parser, main
from posttrain.data import load_preference_pairs
from posttrain.models.reward import RewardModel
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from posttrain.scoring import JUDGE_KINDS, JUDGE_PAIRINGS

HERE = __name__


def lengths(prompts, responses, records):
    return [float(len(r)) for r in responses]


def boom(prompts, responses):
    raise RuntimeError("reference answer missing\nsecond line")


def one_score(prompts, responses):
    return [1.0]


def nan_at_4(prompts, responses):
    return [math.nan if i == 4 else 0.0 for i in range(len(responses))]


def returns_none(prompts, responses):
    return None


def ones(prompts, responses):
    return [1.0] * len(responses)


def test_judge_with_a_reward_model_reads_cut_off_replies_at_their_last_token(tmp_path, samples_file, rm_folder,
                                                                            capsys):
    out = tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(samples_file), "--judge", f"rm:{rm_folder}", "--output", str(out),
                 "--precision", "fp32", "--batch-size", "3"]) == 0
    rows = read_jsonl(out)
    rm = RewardModel.from_pretrained(rm_folder)
    prompts = [SAMPLES[0]["prompt"], SAMPLES[1]["prompt"], SAMPLES[2]["messages"]]
    for row, sample, prompt in zip(rows, SAMPLES, prompts):
        # The stop-string and cut-off replies did not end with EOS: scored without one.
        finished = [why == "eos" for why in sample.get("finish_reasons", ["eos"] * len(sample["responses"]))]
        want = rm.score([prompt] * len(sample["responses"]), sample["responses"], finished=finished)
        assert row["scores"] == pytest.approx(want.tolist(), abs=1e-5)
        assert row["prompt"] == prompt and row["id"] == sample["id"] and row["judge"] == {"spec": f"rm:{rm_folder}"}
    assert "messages" not in rows[2] and rows[0]["sampling"] == {"n": 3}
    assert f"wrote 3 scored lists to {out}" in capsys.readouterr().out
    pairs, report = load_preference_pairs(out, rm.tokenizer, max_length=256)
    assert report.records == 3 and len(pairs) == 3 + 1 + 3


def test_judge_with_a_function_leaves_out_records_with_no_two_different_scores(tmp_path, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "responses": ["xy", "z"]},
                                              {"prompt": "b", "responses": ["same", "more"]},
                                              {"prompt": "c", "responses": ["only"]}])
    out = tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(data), "--judge", f"fn:{HERE}:lengths", "--output", str(out)]) == 0
    assert [r["scores"] for r in read_jsonl(out)] == [[2.0, 1.0]]
    assert "left out 2 records with no two different scores" in capsys.readouterr().out


def test_judge_with_the_tiny_llm_writes_pairs_dpo_loads(tmp_path, samples_file, capsys):
    out = tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(samples_file), "--judge", "llm:tiny-random", "--output", str(out),
                 "--pairing", "best_vs_worst", "--precision", "fp32"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    # 3 + 1 + 3 pairs judged in both orders; best vs worst: at most one pair per record.
    assert "7 pairs compared in both orders" in summary and "position bias in" in summary
    rows = read_jsonl(out)
    assert 1 <= len(rows) <= 3 and all(r["judge"]["pairing"] == "best_vs_worst" for r in rows)
    for row in rows:
        assert row["chosen"] != row["rejected"] and 0.5 < row["judge"]["p_chosen"] < 1
    pairs, _ = load_preference_pairs(out, build_tiny_tokenizer(), max_length=512)
    assert len(pairs) == len(rows)


SAMPLE_ARGS = ["--model", "tiny-random", "--n", "4", "--max-new-tokens", "8", "--precision", "fp32", "--seed", "23"]


@pytest.fixture
def sampled_file(tmp_path) -> Path:
    """What `posttrain sample` writes for 10 prompts × 4. The tiny model now and then emits EOS
    at once; seed 23 was picked for its one empty and one newline-only reply."""
    prompts = [{"prompt": f"question number {i}", "id": i} for i in range(10)]
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--data", str(write_jsonl(tmp_path / "prompts.jsonl", prompts)), "--output", str(out),
                 *SAMPLE_ARGS]) == 0
    samples = read_jsonl(out)
    assert sum(not r.strip() for s in samples for r in s["responses"]) >= 1, "no empty reply: pick another seed"
    return out


def non_empty(responses: list[str]) -> list[int]:
    return [i for i, r in enumerate(responses) if r.strip()]


def test_judge_with_a_function_scores_what_sample_wrote_without_its_empty_replies(tmp_path, sampled_file, capsys):
    samples = {s["prompt_index"]: s for s in read_jsonl(sampled_file)}
    empty = sum(len(s["responses"]) - len(non_empty(s["responses"])) for s in samples.values())
    out = tmp_path / "scored.jsonl"
    assert main(["judge", "--data", str(sampled_file), "--judge", f"fn:{HERE}:lengths", "--output", str(out)]) == 0
    rows = read_jsonl(out)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"judged 10 records (40 responses, {empty} empty responses left out)" in summary
    assert f"left out {10 - len(rows)} records" in summary and rows
    for row in rows:
        source = samples[row["prompt_index"]]
        kept = non_empty(source["responses"])
        assert row["responses"] == [source["responses"][i] for i in kept]
        assert row["finish_reasons"] == [source["finish_reasons"][i] for i in kept]
        assert row["scores"] == [float(len(r)) for r in row["responses"]]
    _, report = load_preference_pairs(out, build_tiny_tokenizer(), max_length=512)
    assert report.records == len(rows)


def test_judge_with_the_tiny_llm_pairs_what_sample_wrote_without_its_empty_replies(tmp_path, sampled_file, capsys):
    samples = {s["prompt_index"]: s for s in read_jsonl(sampled_file)}
    empty = sum(len(s["responses"]) - len(non_empty(s["responses"])) for s in samples.values())
    compared = sum(s["responses"][i] != s["responses"][j] for s in samples.values()
                   for i, j in combinations(non_empty(s["responses"]), 2))
    out = tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(sampled_file), "--judge", "llm:tiny-random", "--output", str(out),
                 "--precision", "fp32"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"(40 responses, {empty} empty responses left out)" in summary
    assert f"{compared} pairs compared in both orders" in summary
    rows = read_jsonl(out)
    for row in rows:  # chosen_index / rejected_index name the samples file's responses
        responses = samples[row["prompt_index"]]["responses"]
        assert (row["chosen"], row["rejected"]) == (responses[row["judge"]["chosen_index"]],
                                                    responses[row["judge"]["rejected_index"]])
    pairs, _ = load_preference_pairs(out, build_tiny_tokenizer(), max_length=512)
    assert len(pairs) == len(rows) > 0


def test_judge_counts_the_empty_replies_it_leaves_out(tmp_path, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "a", "responses": ["xy", "", "z"], "finish_reasons": ["length", "eos", "stop"]},
        {"prompt": "b", "responses": [" \n", "only"]},   # one reply left: no pair
        {"prompt": "c", "responses": ["", "\t"]},         # none left
    ])
    out = tmp_path / "scored.jsonl"
    assert main(["judge", "--data", str(data), "--judge", f"fn:{HERE}:lengths", "--output", str(out)]) == 0
    assert [(r["responses"], r["finish_reasons"], r["scores"]) for r in read_jsonl(out)] == [
        (["xy", "z"], ["length", "stop"], [2.0, 1.0])]
    summary = capsys.readouterr().out
    assert "judged 3 records (7 responses, 4 empty responses left out)" in summary
    assert "left out 2 records with no two different scores" in summary
    # The LLM judge compares "xy" with "z" only; a tie margin of 1 makes every verdict a pair.
    out = tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(data), "--judge", "llm:tiny-random", "--output", str(out),
                 "--precision", "fp32", "--tie-margin", "1"]) == 0
    summary = capsys.readouterr().out
    assert "judged 3 records (7 responses, 4 empty responses left out)" in summary
    assert "1 pairs compared in both orders, 1 pairs written" in summary
    [row] = read_jsonl(out)
    assert {row["judge"]["chosen_index"], row["judge"]["rejected_index"]} == {0, 2}


def test_score_command_writes_one_score_per_record(tmp_path, rm_folder, capsys):
    records = [{"prompt": "upper: abc", "response": "ABC", "id": 1},
               {"messages": [{"role": "user", "content": "upper: abc"}, {"role": "assistant", "content": "abc"}]}]
    data = write_jsonl(tmp_path / "s.jsonl", records)
    out = tmp_path / "scored.jsonl"
    args = ["score", "--model", str(rm_folder), "--data", str(data), "--output", str(out), "--precision", "fp32"]
    assert main(args) == 0
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "score"} for r in rows] == records
    expected = RewardModel.from_pretrained(rm_folder).score(["upper: abc"] * 2, ["ABC", "abc"])
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)

    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {"prompt": "x", "response": 3}])
    assert main(["score", "--model", str(rm_folder), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: record 2: field 'response': expected a non-empty string, got number 3" in err


def test_score_command_takes_a_spec(tmp_path, rm_folder, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "hello"},
                                              {"prompt": "yo", "response": "abc"}])
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--judge", f"fn:{HERE}:lengths", "--data", str(data), "--output", str(out)]) == 0
    assert [r["score"] for r in read_jsonl(out)] == [5.0, 3.0]
    assert main(["score", "--judge", f"rm:{rm_folder}", "--data", str(data), "--precision", "fp32"]) == 0
    want = RewardModel.from_pretrained(rm_folder).score(["hi", "yo"], ["hello", "abc"]).tolist()
    assert [r["score"] for r in read_jsonl_text(capsys.readouterr().out)] == pytest.approx(want, abs=1e-5)


def read_jsonl_text(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def bracketed_judge(tmp_path):
    """A judge folder whose template wraps replies in brackets: "A" renders as "[A]", 3 tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE.replace("message['content']", "('[' + message['content'] + ']')")
    tokenizer.save_pretrained(tmp_path / "bracketed")
    return tmp_path / "bracketed"


def bad_cases(samples, rm_folder, bracketed, rubric):
    one = write_jsonl(samples.parent / "one.jsonl", [{"prompt": "q", "responses": ["a"]}])
    wrong = write_jsonl(samples.parent / "wrong.jsonl", [SAMPLES[0], {**SAMPLES[1], "finish_reasons": ["eos"]}])
    return {
        "unknown kind": (["judge", "--data", samples, "--judge", "xx:model"], "unknown judge spec, expected one of"),
        "not a reward model": (["judge", "--data", samples, "--judge", "rm:tiny-random"],
                               "rm:tiny-random: not a reward model (architectures ['LlamaForCausalLM']"),
        "function raises": (["judge", "--data", samples, "--judge", f"fn:{HERE}:boom"],
                            f"fn:{HERE}:boom: raised RuntimeError: reference answer missing"),
        "function returns None": (["judge", "--data", samples, "--judge", f"fn:{HERE}:returns_none"],
                                  f"fn:{HERE}:returns_none: returned None, expected a list of 8 numbers"),
        "wrong count": (["judge", "--data", samples, "--judge", f"fn:{HERE}:one_score"],
                        f"fn:{HERE}:one_score: returned 1 scores for 8 responses"),
        "nan": (["judge", "--data", samples, "--judge", f"fn:{HERE}:nan_at_4"],
                f"record 2: field 'responses[1]': fn:{HERE}:nan_at_4: score 4 is nan"),
        "label not one token": (["judge", "--data", samples, "--judge", f"llm:{bracketed}"],
                                f"llm:{bracketed}: label 'A' is 3 tokens"),
        "bad record, before any model": (["judge", "--data", wrong, "--judge", "rm:/no/such/folder"],
                                         "wrong.jsonl: record 2: field 'finish_reasons': expected a list of 2 values"),
        "one response for a pair judge": (["judge", "--data", one, "--judge", "llm:tiny-random"],
                                          "one.jsonl: record 1: field 'responses': expected at least 2 responses"),
        "pairing for a scorer": (["judge", "--data", samples, "--judge", f"rm:{rm_folder}", "--pairing", "all"],
                                 "--pairing: only for an llm: judge"),
        "rubric without placeholders": (["judge", "--data", samples, "--judge", "llm:tiny-random", "--rubric", rubric],
                                        "expected the placeholders"),
        "gap of 0.5 or more": (["judge", "--data", samples, "--judge", "llm:tiny-random", "--min-score-gap", "0.5"],
                               "min_score_gap: an LLM judge's preference lies within 0.5 of even"),
        "score with an llm judge": (["score", "--data", samples, "--judge", "llm:tiny-random"],
                                    "the LLM judge compares pairs of responses"),
    }


CASES = ["unknown kind", "not a reward model", "function raises", "function returns None", "wrong count", "nan", "label not one token",
         "bad record, before any model", "one response for a pair judge", "pairing for a scorer",
         "rubric without placeholders", "gap of 0.5 or more", "score with an llm judge"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, samples_file, rm_folder, bracketed_judge, capsys):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("{prompt} A: {response_a}")
    argv, message = bad_cases(samples_file, rm_folder, bracketed_judge, rubric)[case]
    out = tmp_path / "prefs.jsonl"
    assert main([str(a) for a in argv] + ["--output", str(out), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".prefs.jsonl*"))


def test_cli_choices_are_the_registries_keys(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["judge", "--help"])
    text = "".join(capsys.readouterr().out.split())
    assert all(f"{kind}:" in text for kind in JUDGE_KINDS)
    assert "--pairing{" + ",".join(JUDGE_PAIRINGS) + "}" in text


def output_cases(tmp_path: Path, data: Path) -> dict[str, tuple[str, str]]:
    """--output value -> the error it gets, for an input file `data` in tmp_path/in/."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.jsonl").symlink_to(data)
    return {
        "an existing folder": (str(tmp_path / "folder"), f"--output {tmp_path / 'folder'} is a folder"),
        "in a missing folder": (str(tmp_path / "nope" / "o.jsonl"),
                                f"--output {tmp_path / 'nope' / 'o.jsonl'}: folder {tmp_path / 'nope'} does not exist"),
        "the input": (str(data), f"--output {data} is the input file itself"),
        "the input via ..": (f"{tmp_path}/folder/../in/{data.name}", "is the input file itself"),
        "the input via a symlink": (str(tmp_path / "link.jsonl"), "is the input file itself"),
    }


@pytest.mark.parametrize("command", ["judge", "score"])
@pytest.mark.parametrize("case", ["an existing folder", "in a missing folder", "the input", "the input via ..",
                                  "the input via a symlink"])
def test_an_unwritable_output_stops_before_any_model_loads(command, case, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    records = SAMPLES if command == "judge" else [{"prompt": "p", "response": "r"}]
    data = write_jsonl(tmp_path / "in" / "d.jsonl", records)
    before = data.read_bytes()
    output, message = output_cases(tmp_path, data)[case]
    # A reward model folder that does not exist: were it loaded first, that would be the error.
    assert main([command, "--data", str(data), "--judge", "rm:/no/such/folder", "--output", output]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"posttrain {command}: error: ") and message in err[0], err
    assert data.read_bytes() == before and not (tmp_path / "nope").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.jsonl", "folder", "in", "link.jsonl"]


def nothing_cases(tmp_path: Path) -> dict[str, tuple[list, list[str], str]]:
    """Samples, judge flags, and why `posttrain judge` writes nothing."""
    fn = ["--judge", f"fn:{HERE}:lengths"]
    return {
        "single responses": ([{"prompt": "a", "responses": ["x"]}, {"prompt": "b", "responses": ["yz", ""]}], fn,
                             "no record has two different scores (2 with under two non-empty responses, 0 with all "
                             "scores equal; mean score 1.5), so there is no pair for `posttrain rm` / `dpo`"),
        "all scores equal": ([{"prompt": "a", "responses": ["x", "y"]}], ["--judge", f"fn:{HERE}:ones"],
                             "(0 with under two non-empty responses, 1 with all scores equal; mean score 1)"),
        "all replies empty": ([{"prompt": "a", "responses": ["", " \n"]}], fn,
                              "all 2 responses of the 1 records are empty or whitespace: nothing to judge"),
        "all replies empty, keep-all": ([{"prompt": "a", "responses": [""]}], [*fn, "--keep-all"],
                                        "all 1 responses of the 1 records are empty or whitespace"),
        "identical replies": ([{"prompt": "a", "responses": ["same", "same"]}], ["--judge", "llm:tiny-random"],
                              "no record has two different non-empty responses: nothing to compare"),
        # A tie margin of 0: any disagreement between the two orders is a tie, and the random
        # tiny model always disagrees with itself a little.
        "every pair a tie": (SAMPLES, ["--judge", "llm:tiny-random", "--tie-margin", "0"],
                             "all 7 pairs were ties (position bias"),
    }


@pytest.mark.parametrize("case", ["single responses", "all scores equal", "all replies empty",
                                  "all replies empty, keep-all", "identical replies", "every pair a tie"])
def test_a_judge_run_that_would_write_nothing_says_why_and_writes_no_file(case, tmp_path, capsys):
    records, flags, message = nothing_cases(tmp_path)[case]
    data, out = write_jsonl(tmp_path / "s.jsonl", records), tmp_path / "prefs.jsonl"
    assert main(["judge", "--data", str(data), *flags, "--output", str(out), "--precision", "fp32"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith(f"posttrain judge: error: {data}: wrote nothing to {out}: "), err
    assert message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_the_tie_message_suggests_a_stronger_judge_or_a_larger_margin(tmp_path, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", SAMPLES[:1])
    assert main(["judge", "--data", str(data), "--judge", "llm:tiny-random", "--tie-margin", "0",
                 "--output", str(tmp_path / "o.jsonl"), "--precision", "fp32"]) == 2
    assert capsys.readouterr().err.strip().endswith("all 3 pairs were ties (position bias 3/3): the judge cannot "
                                                   "tell these replies apart; try a stronger --judge model or a "
                                                   "larger --tie-margin")


@pytest.mark.parametrize("command", ["judge", "score"])
def test_help_shows_one_true_default_per_flag(command, capsys):
    from posttrain.scoring.judge import DEFAULT_TIE_MARGIN

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = text.split("options:")[1].split(" --")[1:]
    assert len(flags) >= 5
    for flag in flags:
        assert flag.count("(default:") <= 1 and "(default: None)" not in flag, flag
    if command == "judge":
        assert f"--tie-margin TIE_MARGIN llm: a tie when the two orders' preferences differ by more (default: " \
               f"{DEFAULT_TIE_MARGIN})" in text
        assert "(default: all)" in text and "(default: built in)" in text and "--data DATA samples JSONL" in text


def test_whitespace_around_a_spec_and_its_target_is_ignored(tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "responses": ["xy", "z"]}])
    out = tmp_path / "scored.jsonl"
    assert main(["judge", "--data", str(data), "--judge", f" fn: {HERE}:lengths ", "--output", str(out)]) == 0
    [row] = read_jsonl(out)
    assert row["scores"] == [2.0, 1.0] and row["judge"] == {"spec": f"fn:{HERE}:lengths"}
