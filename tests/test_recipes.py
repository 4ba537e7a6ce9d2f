"""Recipes: the plan, the cache, --from, resume, and every bad-recipe error before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain.recipes import RecipeError, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def brevity(prompts, responses):
    """A toy judge: shorter replies score higher (the recipe only needs some ordering)."""
    return [-float(len(r)) for r in responses]


def recipe(tmp_path: Path, **changes) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hi", "why is the sky blue", "count")))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": p, "completion": "ok."}) + "\n" for p in ("a", "b", "c", "d")))
    stages = [
        {"name": "sft", "kind": "sft", "model": "tiny-random", "data": str(sft_data), "max_steps": 2},
        {"name": "samples", "kind": "sample", "model": "${sft}", "data": str(prompts), "n": 3,
         "max_new_tokens": 6, "temperature": 1.0},
        {"name": "prefs", "kind": "judge", "data": "${samples}", "judge": "fn:tests.test_recipes:brevity"},
        {"name": "dpo", "kind": "dpo", "model": "${sft}", "data": "${prefs}", "max_steps": 2},
    ]
    raw = {"output_dir": str(tmp_path / "out"), "defaults": {"precision": "fp32", "batch_size": 2}, "stages": stages}
    raw.update(changes)
    return raw


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)   # fn:tests.test_recipes:brevity imports from the repository root


def test_recipe_runs_then_is_cached_then_reruns_from_a_stage(tmp_path, in_repo):
    raw = recipe(tmp_path)
    first: list[str] = []
    outputs = run_recipe(raw, echo=first.append)
    assert [line.split()[1] for line in first[:4]] == ["sft", "samples", "prefs", "dpo"]
    assert all(" ran in " in line for line in first[:4]), first
    assert first[4].startswith("finished in ") and len(first) == 5
    assert (outputs["dpo"] / "model.safetensors").is_file()
    assert (tmp_path / "out" / "dpo").resolve() == outputs["dpo"].resolve()
    # Each stage's printing went to its log, not the console.
    assert "resolved config" in (outputs["sft"] / "log.txt").read_text()
    mtime = (outputs["dpo"] / "model.safetensors").stat().st_mtime_ns

    second: list[str] = []
    assert run_recipe(raw, echo=second.append) == outputs
    assert all(" cached " in line for line in second[:4]), second
    assert (outputs["dpo"] / "model.safetensors").stat().st_mtime_ns == mtime

    third: list[str] = []
    run_recipe(raw, from_stage="prefs", echo=third.append)
    assert [("cached" in line) for line in third[:4]] == [True, True, False, False]

    # A changed key makes a new folder for that stage and everything downstream, nothing else.
    raw["stages"][1]["n"] = 2
    fourth: list[str] = []
    changed = run_recipe(raw, echo=fourth.append)
    assert [("cached" in line) for line in fourth[:4]] == [True, False, False, False]
    assert changed["sft"] == outputs["sft"] and changed["samples"] != outputs["samples"]


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    lines: list[str] = []
    run_recipe(recipe(tmp_path), dry_run=True, echo=lines.append)
    assert [line.split()[1:4] for line in lines][0][:3] == ["sft", "sft", "run"]
    assert len(lines) == 4
    assert not (tmp_path / "out").exists()


def test_a_changed_input_file_changes_the_hash(tmp_path):
    raw = recipe(tmp_path)
    before: list[str] = []
    run_recipe(raw, dry_run=True, echo=before.append)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    after: list[str] = []
    run_recipe(raw, dry_run=True, echo=after.append)
    assert before[0] != after[0] and before[2] != after[2]   # sft and everything that used it


@pytest.mark.parametrize("where, value, message", [
    ("samples", "d.jsonl\ufeff", "stage 'samples' (sample): data='d.jsonl\\ufeff' holds a hidden character, U+FEFF "
                                  "(ZERO WIDTH NO-BREAK SPACE) at position 8; type the name again"),
    ("output_dir", "out\u200b", "output_dir='out\\u200b' holds a hidden character, U+200B (ZERO WIDTH SPACE) at "
                                "position 4"),
])
def test_a_hidden_character_in_a_recipes_path_is_refused_before_any_stage_runs(tmp_path, monkeypatch, where, value,
                                                                               message):
    # a fresh user's finding: the sample stage failed after sft had run, printing "d.jsonl: no such file"
    monkeypatch.chdir(tmp_path)
    raw = recipe(tmp_path)
    if where == "output_dir":
        raw["output_dir"] = value
    else:
        raw["stages"][1]["data"] = value
    with pytest.raises(RecipeError) as err:
        run_recipe(raw)
    assert message in str(err.value), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "sft.jsonl"]


def test_a_quoted_number_is_the_same_stage_as_the_number(tmp_path):
    # a fresh user's finding: `temperature: "1.0"` for 1.0 ran a cached stage again (hash before conversion)
    def plan(raw):
        lines: list[str] = []
        run_recipe(raw, dry_run=True, echo=lines.append)
        return lines

    raw = recipe(tmp_path)
    quoted = recipe(tmp_path)
    quoted["stages"][0]["max_steps"] = "2"
    quoted["stages"][1].update(n="3", temperature="1.0")
    quoted["defaults"]["batch_size"] = "2"
    assert plan(quoted) == plan(raw)
    hotter = recipe(tmp_path)
    hotter["stages"][1]["temperature"] = "0.7"
    assert plan(hotter)[0] == plan(raw)[0] and plan(hotter)[1:] != plan(raw)[1:]


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "a", "kind": "sfft", "model": "m", "data": "d"}]}, "unknown kind 'sfft'; known kinds: sft"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "m", "data": "d", "lr_rate": 1}]},
     "stage 'a': unknown key 'lr_rate' for kind sft"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "m"}]}, "stage 'a': kind sft needs the key 'data'"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "${sfft}", "data": "d"},
                 {"name": "sft", "kind": "sft", "model": "m", "data": "d"}]},
     "stage 'a' refers to ${sfft}, which is no stage (did you mean 'sft'?)"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "${b}", "data": "d"},
                 {"name": "b", "kind": "sft", "model": "${a}", "data": "d"}]}, "in a cycle: "),
    ({"stages": [{"name": "a", "kind": "sft", "model": "m", "data": "d"},
                 {"name": "a", "kind": "sft", "model": "m", "data": "d"}]}, "name 'a' is used twice"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "m", "data": "d", "lr": -1.0}]}, "lr"),
    ({"stages": [{"name": "a", "kind": "sft", "model": "m", "data": "d", "max_steps": "ten"}]}, "max_steps='ten'"),
    ({"stages": [{"name": "a", "kind": "judge", "data": "d", "judge": "fn:x:y", "pairs": "all"}]},
     "unknown key 'pairs' for kind judge (did you mean 'pairing'?)"),
    # Function stages' keys are checked against the function's parameter types, as trainers' are.
    ({"stages": [{"name": "s", "kind": "sample", "model": "m", "data": "d", "n": "2.5"}]},
     "stage 's' (sample): n='2.5' should be of type int"),
    ({"stages": [{"name": "s", "kind": "sample", "model": "m", "data": "d", "skip_invalid": "maybe"}]},
     "stage 's' (sample): skip_invalid='maybe' should be of type bool"),
    ({"stages": [{"name": "m", "kind": "mix", "specs": "sft.jsonl", "n": 2}], "defaults": {}},
     "stage 'm' (mix): specs='sft.jsonl' should be of type list[str]"),
    ({"stages": [{"name": "m", "kind": "mix", "specs": ["a.jsonl"], "n": 2.5}], "defaults": {}}, "n=2.5 should be of type int"),
    ({"stages": [{"name": "m", "kind": "mix", "specs": ["a.jsonl"], "n": True}], "defaults": {}}, "n=True should be of type int"),
    ({"stages": [{"name": "m", "kind": "mix", "specs": ["a.jsonl"], "n": 2, "cap": "x"}], "defaults": {}},
     "cap='x' should be of type int | None"),
    # A sample stage's ranges too, though it comes after a stage that would have run first.
    *[({"stages": [{"name": "a", "kind": "sft", "model": "m", "data": "d"},
                   {"name": "s", "kind": "sample", "model": "${a}", "data": "d", **keys}]},
       f"stage 's' (sample): {why}") for keys, why in [
        ({"n": 0}, "sampling: n=0 must be ≥ 1"), ({"temperature": "-0.5"}, "sampling: temperature=-0.5 must be finite and ≥ 0"),
        ({"batch_size": 0}, "batch_size=0 must be ≥ 1"), ({"max_prompt_length": 0}, "max_prompt_length=0 must"),
        ({"precision": "fp16"}, "precision='fp16' is not one of auto, bf16, fp32")]],
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"output": "x"}, "unknown top-level key 'output'"),
])
def test_bad_recipes_fail_before_anything_runs(tmp_path, change, message):
    raw = recipe(tmp_path, **change)
    with pytest.raises(RecipeError, match=None) as err:
        run_recipe(raw, echo=lambda line: None)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_function_stage_values_are_converted_as_trainer_keys_are():
    from posttrain.recipes import Stage, function_stage_values

    stage = Stage(index=0, name="s", kind="sample", keys={}, needs=[])
    values = function_stage_values("r.yaml", stage, {"model": "m", "data": "d", "skip_invalid": "false",
                                                     "temperature": "1e-1", "top_p": 1, "stop_strings": None,
                                                     "n": "2"})
    assert values == {"model": "m", "data": "d", "skip_invalid": False, "temperature": 0.1, "top_p": 1.0,
                      "stop_strings": None, "n": 2}
    assert type(values["top_p"]) is float


def test_a_quoted_false_stops_a_sample_stage_at_a_bad_record(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": 5}\n')
    raw = {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "s", "kind": "sample", "model": "tiny-random", "data": str(prompts), "n": 1, "max_new_tokens": 2,
         "skip_invalid": "false"}]}
    with pytest.raises(RecipeError, match=r"^stage 's' \(sample\): .*p\.jsonl: record 2: field 'prompt'"):
        run_recipe(raw, echo=lambda line: None)


EVAL = {"name": "eval", "kind": "eval", "models": {"dpo": "${dpo}"}, "baseline": "${sft}", "data": "d",
        "judge": "fn:tests.test_recipes:brevity"}
REPORT = {"name": "report", "kind": "report", "evals": {"x": "${eval}/eval.json"}}


@pytest.mark.parametrize("keys, extra, message", [
    ({"baselines": {"start": "tiny-random"}}, [], "give either 'baseline' (one model) or 'baselines'"),
    ({"baseline": None}, [], "not neither"),
    ({"baseline": None, "baselines": {}}, [], "'baselines' must be a non-empty mapping"),
    ({"baseline": None, "baselines": {"a": 5}}, [], "baselines entry 'a': 5: expected a label and a model name"),
    ({"models": {"sft": "tiny-random"}, "baseline": None, "baselines": {"sft": "${sft}"}}, [],
     "label 'sft' names model tiny-random and baseline"),
    ({"models": {"sft": "${sft}"}, "baseline": None, "baselines": {"sft": "${sft}"}}, [],
     "baseline 'sft' has no model to judge against it"),
    ({"kl_samples": -1}, [], "--kl-samples=-1: expected at least 0"),
    ({"confidence": "high"}, [], "stage 'eval' (eval): confidence='high' should be of type float"),
    ({"n_samples": 3}, [], "greedy decoding gives 3 identical answers"),
    ({"baseline": None, "baselines": {"a": "tiny-random", "b": "${sft}"}}, [REPORT],
     "stage 'report' refers to ${eval}/eval.json, which stage 'eval' does not write; it writes a/eval.json"),
    ({}, [{**REPORT, "evals": {"x": "${eval}/a/eval.json"}}],
     "refers to ${eval}/a/eval.json, which stage 'eval' does not write; it writes eval.json, eval.md"),
])
def test_bad_eval_stages_fail_before_anything_runs(tmp_path, keys, extra, message):
    raw = recipe(tmp_path)
    raw["stages"] += [{k: v for k, v in {**EVAL, **keys}.items() if v is not None}, *extra]
    with pytest.raises(RecipeError) as err:
        run_recipe(raw, echo=lambda line: None)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_from_an_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="--from 'dop' is no stage; stages: sft, samples, prefs, dpo"):
        run_recipe(recipe(tmp_path), from_stage="dop", echo=lambda line: None)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        run_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        run_recipe(bad)


def test_an_interrupted_trainer_stage_resumes_from_its_checkpoint(tmp_path, spawn):
    """SIGTERM during the SFT stage: the trainer checkpoints and exits 143; the second run
    resumes that stage (not from step 0) and finishes the recipe."""
    raw = recipe(tmp_path)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["max_steps"] = 400
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = spawn([sys.executable, "-m", "posttrain.cli", "run", str(path)], cwd=ROOT, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # wait for a few steps of training
        found = list((tmp_path / "out").glob("sft-*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, "the SFT stage never logged 3 steps"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert not (metrics.parent / "DONE").exists()
    lines: list[str] = []
    run_recipe(path, echo=lines.append)
    assert "resumed in" in lines[0], lines
    assert "resumed from" in (metrics.parent / "log.txt").read_text()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "step" in line]
    assert steps[-1] == 400 and steps == sorted(steps)


def test_a_python_stage_writes_data_and_its_hash_follows_its_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "my_data_step.py"
    module.write_text("import json\n\ndef write(output, n=2):\n"
                      "    open(output, 'w').write(''.join(json.dumps({'prompt': str(i), 'completion': 'x'}) + '\\n'"
                      " for i in range(n)))\n")
    raw = {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "made", "kind": "python", "function": "my_data_step:write", "args": {"n": 3}},
        {"name": "both", "kind": "concat", "files": ["${made}", "${made}"]}]}
    outputs = run_recipe(raw, echo=lambda line: None)
    assert len(outputs["both"].read_text().splitlines()) == 6
    module.write_text(module.read_text() + "\n# edited\n")
    plan: list[str] = []
    run_recipe(raw, dry_run=True, echo=plan.append)
    assert [line.split()[3] for line in plan] == ["run", "run"]


def test_a_python_stage_that_writes_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy_step.py").write_text("def write(output):\n    return 0\n")
    raw = {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "made", "kind": "python", "function": "lazy_step:write"}]}
    with pytest.raises(ValueError, match="lazy_step:write returned without writing"):
        run_recipe(raw, echo=lambda line: None)
    assert not (tmp_path / "out" / "made").exists()


def test_a_stage_that_fails_is_named_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom_step.py").write_text("def write(output):\n    open(output, 'w').write('half')\n"
                                           "    raise RuntimeError('data step exploded')\n")
    raw = {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "made", "kind": "python", "function": "boom_step:write"}]}
    with pytest.raises(RecipeError, match=r"^stage 'made' \(python\): boom_step:write raised RuntimeError: "
                                          r"data step exploded$"):
        run_recipe(raw, echo=lambda line: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_typo_in_defaults_is_an_error(tmp_path):
    raw = recipe(tmp_path, defaults={"precison": "fp32"})
    with pytest.raises(RecipeError, match="'defaults' key 'precison' is a key of no stage's kind in this recipe "
                                          r"\(did you mean 'precision'\?\)"):
        run_recipe(raw, echo=lambda line: None)


def test_editing_an_fn_judge_module_reruns_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    judge = tmp_path / "my_judge.py"
    judge.write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    raw = recipe(tmp_path)
    raw["stages"][2]["judge"] = "fn:my_judge:score"
    before: list[str] = []
    run_recipe(raw, dry_run=True, echo=before.append)
    judge.write_text(judge.read_text() + "# edited\n")
    after: list[str] = []
    run_recipe(raw, dry_run=True, echo=after.append)
    assert before[:2] == after[:2] and before[2] != after[2] and before[3] != after[3]
