"""The verifiable arithmetic task: examples/rewards.py on hand cases, the data files against the
script that writes them, and `fn:examples.rewards:…` importable from the repository root, by the
`posttrain` script too (whose sys.path lacks the current folder)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.scoring import load_reward_fn

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rewards = load_example("rewards")


@pytest.mark.parametrize("response, value", [
    ("95", 95), (" 95\n", 95), ("The answer is 95.", 95), ("-50", -50), ("−50", -50), ("1,234 apples", 1234),
    ("95.0", 95), ("95.5", None), ("37 + 58 = 95", 95), ("95, not 96", 96), ("ninety-five", None), ("", None),
])
def test_last_integer(response, value):
    assert rewards.last_integer(response) == value


def test_exact_match_compares_the_last_integer_with_the_records_answer():
    responses = ["95", "The answer is 95.", "37 + 58 = 95", "95 + 1 = 96", "95.5", "ninety-five", "-4", "4"]
    records = [{"answer": "95"}] * 6 + [{"answer": "-4"}, {"answer": "-4"}]
    assert rewards.exact_match([""] * 8, responses, records) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"no 'answer' field \(fields \['id'\]\)"):
        rewards.exact_match(["q"], ["1"], [{"id": 3}])


def test_format_reward_wants_a_bare_integer():
    assert rewards.format_reward([""] * 5, ["95", " -3\n", "95.", "It is 95", "1,234"]) == [1.0, 1.0, 0.0, 0.0, 0.0]


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_the_data_files_are_what_the_script_writes_and_their_answers_are_right():
    train, held_out = records("arithmetic.jsonl"), records("arithmetic_eval.jsonl")
    maker = load_example("make_arithmetic")
    assert len(train) == maker.TRAIN == 200 and len(held_out) == maker.EVAL == 50
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held_out)
    assert sorted(map(json.dumps, train + held_out)) == sorted(map(json.dumps, maker.questions(250, maker.SEED)))
    operations = set()
    for record in train + held_out:
        a, op, b = record["prompt"].removeprefix("What is ").split("?")[0].split()
        assert 1 <= int(a) <= 99 and 1 <= int(b) <= 99
        assert record["answer"] == str(maker.OPERATIONS[op](int(a), int(b)))
        operations.add(op)
    assert operations == {"+", "-", "×"}


def test_fn_specs_import_from_the_current_folder_when_sys_path_lacks_it(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text("def reward(prompts, responses):\n    return [1.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mytask", raising=False)
    before = list(sys.path)
    assert load_reward_fn("mytask:reward")(["p"], ["r"]) == [1.0]
    assert sys.path == before                                   # the folder was on it for the import only


def test_the_posttrain_script_judges_with_examples_rewards_from_the_repository_root(tmp_path):
    samples = tmp_path / "samples.jsonl"
    questions = records("arithmetic_eval.jsonl")[:2]
    samples.write_text("".join(json.dumps({**q, "responses": [q["answer"], "0", f"It is {q['answer']}"]}) + "\n"
                               for q in questions))
    out = tmp_path / "scored.jsonl"
    script = Path(sys.executable).parent / "posttrain"
    result = subprocess.run([str(script), "judge", "--data", str(samples), "--judge", "fn:examples.rewards:exact_match",
                             "--keep-all", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["scores"] for line in out.read_text().splitlines()] == [[1.0, 0.0, 1.0]] * 2
    assert "mean score 0.6667" in result.stdout
