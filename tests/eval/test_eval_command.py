"""`posttrain eval` end to end on tiny random models with a function judge: every number in
eval.json recomputed from the answers it holds; and the one-line errors before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.eval.format import FORMAT, SHOWCASE_PROMPT
from posttrain.models.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __name__


def vowels(prompts: list[str], responses: list[str]) -> list[float]:
    """The judge: how many lower-case vowels a reply holds (any deterministic score will do)."""
    return [float(sum(c in "aeiou" for c in r)) for r in responses]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """(prompt file of 6 records, a second tiny model: seed 1, so its answers differ)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about thing {i}."}) + "\n" for i in range(5))
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Why?"}]}) + "\n")
    tokenizer = build_tiny_tokenizer()
    other = tmp_path / "other"
    build_tiny_model(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    return data, other


def test_eval_numbers_follow_from_the_answers(setup, tmp_path, capsys):
    data, other = setup
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"other={other}", "--model", "same=tiny-random", "--baseline", "base=tiny-random",
                 "--data", str(data), "--judge", f"fn:{HERE}:vowels", "--output-dir", str(out),
                 "--max-new-tokens", "12", "--temperature", "1", "--n-samples", "2", "--precision", "fp32"]) == 0
    console = capsys.readouterr().out
    assert f"judge fn:{HERE}:vowels (took no part in training); 6 prompts × 2 answers, temperature 1" in console
    assert "| model | win rate vs base | LC win rate |" in console and "| base (baseline) | — |" in console

    result = json.loads((out / "eval.json").read_text())
    assert result["format"] == FORMAT and result["prompts"] == 6 and result["n_samples"] == 2
    assert result["judge"] == {"spec": f"fn:{HERE}:vowels", "kind": "fn", "used_in_training": False}
    assert [m["label"] for m in result["models"]] == ["other", "same"] and result["baseline"]["label"] == "base"
    samples = result["samples"]
    assert samples[5]["prompt"] == "system: Be brief.\n\nuser: Why?"

    # Every outcome and mean score again from the stored answers, with the judge itself.
    for m in [*result["models"], result["baseline"]]:
        scores = np.array([vowels([], s["answers"][m["label"]]) for s in samples])                # [6, 2]
        assert m["mean_score"] == pytest.approx(scores.mean())
        assert m["mean_length_tokens"] == pytest.approx(np.mean([s["lengths"][m["label"]] for s in samples]))
        assert m["eos_rate"] == pytest.approx(np.mean([[r == "eos" for r in s["finish_reasons"][m["label"]]]
                                                       for s in samples]))
        assert all(n <= 12 for s in samples for n in s["lengths"][m["label"]])
    base = np.array([vowels([], s["answers"]["base"]) for s in samples])
    for m in result["models"]:
        mine = np.array([vowels([], s["answers"][m["label"]]) for s in samples])
        outcomes = np.where(mine > base, 1.0, np.where(mine < base, 0.0, 0.5))
        assert [s["outcomes"][m["label"]] for s in samples] == outcomes.tolist()
        c = m["vs_baseline"]
        assert c["win_rate"] == pytest.approx(outcomes.mean())
        assert (c["wins"], c["ties"], c["losses"]) == tuple(int((outcomes == v).sum()) for v in (1, 0.5, 0))
        assert c["win_interval"][0] <= c["win_rate"] <= c["win_interval"][1]
        # Answers sampled at temperature 1 without truncation are draws from the model: the KL
        # estimate reuses all 6 × 2 of them.
        assert c["kl_sequences"] == 12 and c["kl_note"] == ""

    same = result["models"][1]["vs_baseline"]
    # The baseline against itself: the same answers (same seeds), all ties, and log-ratios of
    # exactly 0.
    assert all(s["answers"]["same"] == s["answers"]["base"] for s in samples)
    assert (same["win_rate"], same["ties"], same["kl"], same["kl_standard_error"]) == (0.5, 12, 0.0, 0.0)
    assert same["win_interval"] == same["lc_interval"] == [0.5, 0.5]
    assert result["models"][0]["vs_baseline"]["kl"] > 0
    assert set(result["showcase"]["answers"]) == {"base", "other", "same"}
    assert result["showcase"]["prompt"] == SHOWCASE_PROMPT
    table = (out / "eval.md").read_text()
    assert "| prompt | base | other | same |" in table and "Tell me about thing 0." in table


def test_greedy_eval_draws_separate_kl_samples_and_records_the_judge_took_part(setup, tmp_path, capsys):
    data, other = setup
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(other), "--baseline", "tiny-random", "--data", str(data),
                 "--judge", f"fn:{HERE}:vowels", "--judge-used-in-training", "--kl-samples", "3",
                 "--output-dir", str(out), "--max-new-tokens", "8", "--precision", "fp32"]) == 0
    assert "TOOK PART in building the training data or rewards" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["judge"]["used_in_training"] is True
    assert result["sampling"]["temperature"] == 0.0
    assert [m["label"] for m in result["models"]] == [str(other)]                 # unlabelled: the model itself
    # Greedy answers are not samples of the model's distribution: 3 per prompt are drawn for KL.
    assert result["models"][0]["vs_baseline"]["kl_sequences"] == 6 * 3


def test_several_baselines_sample_each_model_once(setup, tmp_path, capsys):
    # "mid" is both judged (against "start") and a baseline (of "other"), as a recipe's SFT model
    # is; mid and start are the same weights, so every number against one equals that against
    # the other, and mid's answers are the very ones it was judged by.
    data, other = setup
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"other={other}", "--model", "mid=tiny-random", "--baseline", "start=tiny-random",
                 "--baseline", "mid=tiny-random", "--data", str(data), "--judge", f"fn:{HERE}:vowels",
                 "--output-dir", str(out), "--max-new-tokens", "8", "--precision", "fp32"]) == 0
    console = capsys.readouterr().out
    assert "| model | win rate vs start |" in console and "| model | win rate vs mid |" in console
    vs_start = json.loads((out / "start" / "eval.json").read_text())
    vs_mid = json.loads((out / "mid" / "eval.json").read_text())
    assert not (out / "eval.json").exists()
    assert [m["label"] for m in vs_start["models"]] == ["other", "mid"]
    assert [m["label"] for m in vs_mid["models"]] == ["other"] and vs_mid["baseline"]["label"] == "mid"
    assert sorted(k for k in vs_mid["seconds"] if k.startswith("sample/")) == ["sample/mid", "sample/other",
                                                                             "sample/start"]
    assert [s["answers"]["mid"] for s in vs_mid["samples"]] == [s["answers"]["mid"] for s in vs_start["samples"]]
    assert vs_mid["models"][0]["vs_baseline"] == vs_start["models"][0]["vs_baseline"]
    assert vs_mid["models"][0]["vs_baseline"]["kl"] > 0
    assert set(vs_mid["showcase"]["answers"]) == {"mid", "other"}
    assert "| prompt | mid | other |" in (out / "mid" / "eval.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--judge", "nope:x"], "unknown judge spec"),
    (["--judge", "fn:no_such_module_here:f"], "cannot import"),
    (["--n-samples", "2"], "greedy decoding gives 2 identical answers"),
    (["--model", "a=tiny-random", "--model", "a=tiny-random"], "label 'a' is given twice"),
    (["--model", "base=tiny-random", "--baseline", "base=tiny-random"], "baseline 'base' has no model to judge against it"),
    (["--model", "base=tiny-random", "--model", "x=tiny-random", "--baseline", "base=smollm2-135m-instruct"],
     "label 'base' names model tiny-random and baseline smollm2-135m-instruct"),
    (["--baseline", "a=tiny-random", "--baseline", "a=tiny-random"], "--baseline a=tiny-random: label 'a' is given twice"),
    (["--tie-margin", "0.3"], "only for an llm: judge"),
    (["--kl-samples", "-1"], "expected at least 0"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--model", "./no/such/model"], "no such folder"),
])
def test_bad_options_fail_in_one_line_before_writing(flags, message, setup, tmp_path, capsys, monkeypatch):
    data, _ = setup
    monkeypatch.chdir(tmp_path)
    args = {"--model": ["tiny-random"], "--baseline": ["b=tiny-random"], "--data": [str(data)],
            "--judge": [f"fn:{HERE}:vowels"], "--output-dir": [str(tmp_path / "out")]}
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag] = [v for f, v in zip(flags[::2], flags[1::2]) if f == flag]
    argv = ["eval", "--max-new-tokens", "4"] + [x for flag, values in args.items() for v in values for x in (flag, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("posttrain eval: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_llm_judge_gives_verdicts_in_both_orders(setup, tmp_path):
    # The tiny model as the judge: its labels "A" and "B" are one token each, so it is a valid
    # (random) llm: judge. Each outcome must follow from its recorded verdict.
    data, other = setup
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"other={other}", "--baseline", "tiny-random", "--data", str(data),
                 "--judge", "llm:tiny-random", "--tie-margin", "0.2", "--output-dir", str(out),
                 "--max-new-tokens", "6", "--temperature", "1", "--precision", "fp32"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["judge"]["spec"] == "llm:tiny-random" and result["judge"]["tie_margin"] == 0.2
    assert result["judge"]["rubric"] == "default" and result["judge"]["used_in_training"] is False
    assert result["models"][0]["mean_score"] is None and result["baseline"]["mean_score"] is None
    for s in result["samples"]:
        verdict, outcome = s["verdicts"]["other"][0], s["outcomes"]["other"][0]
        if s["answers"]["other"][0] == s["answers"]["tiny-random"][0]:
            assert verdict is None and outcome == 0.5                        # identical answers: a tie, unjudged
        elif verdict["tie"]:
            assert outcome == 0.5
        else:
            assert outcome == (1.0 if verdict["p_model_better"] > 0.5 else 0.0)


def test_the_showcase_answer_is_the_evals_own_when_the_prompt_is_among_them(setup, tmp_path):
    # Decoded again on its own, in bf16 it could differ from the answer the table shows (greedy
    # text depends on the batch it is decoded in); the report must show one answer, not two.
    data, other = setup
    with data.open("a") as f:
        f.write(json.dumps({"prompt": SHOWCASE_PROMPT}) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"other={other}", "--baseline", "base=tiny-random", "--data", str(data),
                 "--judge", f"fn:{HERE}:vowels", "--output-dir", str(out), "--max-new-tokens", "8",
                 "--kl-samples", "0", "--precision", "fp32"]) == 0
    result = json.loads((out / "eval.json").read_text())
    row = next(s for s in result["samples"] if s["prompt"] == SHOWCASE_PROMPT)
    assert result["showcase"]["answers"] == {label: row["answers"][label][0].strip() for label in ("base", "other")}


def test_where_the_eval_cannot_be_written_is_found_before_any_model_loads(setup, tmp_path, capsys, monkeypatch):
    data, _ = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "b").write_text("x")
    (tmp_path / "dir" / "eval.json").mkdir(parents=True)
    # A model that does not exist: had the output been checked after loading, it would say so instead.
    common = ["eval", "--model", "./no/such/model", "--data", str(data), "--judge", f"fn:{HERE}:vowels"]
    for flags, message in [
        (["--baseline", "tiny-random", "--output-dir", "afile/sub"], "afile is a file; expected a folder"),
        (["--baseline", "a=tiny-random", "--baseline", "b=tiny-random", "--output-dir", "two"],
         "two/b is a file; expected a folder"),
        (["--baseline", "tiny-random", "--output-dir", "dir"], "dir/eval.json is a folder"),
    ]:
        assert main(common + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "two" / "a").exists()


@pytest.mark.parametrize("call, message", [
    (lambda e: e("tiny-random", "tiny-random", "d.jsonl", "fn:m:f"), "models must be a mapping {label: model}"),
    (lambda e: e({"a": "tiny-random"}, {"b": "tiny-random"}, "d.jsonl", "fn:m:f"),
     "baselines entry 'baseline': {'b': 'tiny-random'}: expected a label and a model name"),
    (lambda e: e({"a": "tiny-random"}, "tiny-random", "d.jsonl", len), "judge must be a spec string"),
    (lambda e: e({"a": "tiny-random"}, "tiny-random", "d.jsonl", "fn:m:f", params={"temperature": 1}),
     "params must be a posttrain.SamplingParams"),
    (lambda e: e({"a": "tiny-random"}, "tiny-random", "d.jsonl", "fn:m:f", n_samples="2"), "n_samples must be an integer"),
    (lambda e: e({"a": "tiny-random"}, "tiny-random", "d.jsonl", "fn:m:f", kl_samples=1.5), "kl_samples must be an integer"),
    (lambda e: e({5: "tiny-random"}, "tiny-random", "d.jsonl", "fn:m:f"), "models entry 5: 'tiny-random'"),
])
def test_the_python_api_names_a_wrongly_typed_argument(call, message):
    from posttrain.eval.run import evaluate

    with pytest.raises(ValueError) as err:
        call(evaluate)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
