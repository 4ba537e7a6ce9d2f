"""The main job's recipe (recipes/quickstart.yaml) runs end to end on the tiny model, and its
held-out judge computes the Flesch formula it cites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.recipes import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def tiny_quickstart(tmp_path: Path) -> dict:
    """The shipped recipe with the tiny model and two steps a stage; every stage kept."""
    raw = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "quickstart")
    raw["defaults"]["precision"] = "fp32"
    for stage in raw["stages"]:
        if stage.get("model") == "smollm2-135m-instruct":
            stage["model"] = "tiny-random"
        if "baselines" in stage:
            stage["baselines"] = {label: "tiny-random" if model == "smollm2-135m-instruct" else model
                                  for label, model in stage["baselines"].items()}
        if "max_steps" in stage:
            stage["max_steps"] = 2
        if stage["kind"] in ("sample", "eval", "ppo"):
            stage["max_new_tokens"] = 8
        if stage["kind"] == "judge":   # the tiny model's 8 characters are never 8 words: all would tie
            stage["judge"] = "fn:tests.test_recipes:brevity"
    return raw


def test_the_quickstart_recipe_runs_every_stage_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)   # the recipe names examples/ files and fn:examples.… judges
    lines: list[str] = []
    outputs = run_recipe(tiny_quickstart(tmp_path), echo=lines.append)
    names = [s["name"] for s in yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"]]
    assert [line.split()[2] if line.startswith("[ ") else line.split()[1] for line in lines[:-2]] == names
    assert lines[-1] == f"report: {tmp_path / 'quickstart' / 'report' / 'report.html'}"
    result = json.loads((outputs["eval"] / "start" / "eval.json").read_text())
    assert [m["label"] for m in result["models"]] == ["sft", "dpo", "ppo"] and result["prompts"] == 48
    # Against SFT: DPO and PPO with SFT's own answers, the very ones it was judged by above.
    vs_sft = json.loads((outputs["eval"] / "sft" / "eval.json").read_text())
    assert [m["label"] for m in vs_sft["models"]] == ["dpo", "ppo"] and vs_sft["baseline"]["label"] == "sft"
    assert [s["answers"]["sft"] for s in vs_sft["samples"]] == [s["answers"]["sft"] for s in result["samples"]]
    # The held-out judge built no training data or reward; the recipe checked, the file says so.
    assert result["judge"]["spec"] == "fn:examples.judges:reading_ease"
    assert result["judge"]["used_in_training"] is False
    page = (outputs["report"]).read_text()
    assert "against the starting model" in page and "Explain the moon landing" in page


def test_an_eval_judge_that_built_training_data_is_recorded_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = tiny_quickstart(tmp_path)
    keep = ("countries", "translations", "instructions", "sft", "samples", "judged", "preferences", "dpo")
    raw["stages"] = [s for s in raw["stages"] if s["name"] in keep] + [{
        "name": "eval", "kind": "eval", "models": {"dpo": "${dpo}"}, "baseline": "${sft}",
        "data": "examples/data/eval_prompts.jsonl", "judge": "fn:tests.test_recipes:brevity",
        "max_new_tokens": 4, "kl_samples": 0}]
    outputs = run_recipe(raw, echo=lambda line: None)
    assert json.loads((outputs["eval"] / "eval.json").read_text())["judge"]["used_in_training"] is True


def test_reading_ease_is_the_flesch_formula():
    from examples.judges import flesch_reading_ease, reading_ease, syllables

    # "The cat sat on the mat." 6 words, 1 sentence, 6 syllables:
    # 206.835 − 1.015·6 − 84.6·1 = 116.145
    assert flesch_reading_ease("The cat sat on the mat.") == pytest.approx(116.145)
    # "Rockets carry astronauts. They fly." 5 words, 2 sentences; syllables 2 + 2 + 3 + 1 + 1 = 9:
    # 206.835 − 2.5375 − 152.28 = 52.0175
    assert syllables("astronauts") == 3
    assert flesch_reading_ease("Rockets carry astronauts. They fly.") == pytest.approx(52.0175)
    finished = "The Moon is a big rock in the sky, and people flew there in a rocket."
    scores = reading_ease([""] * 3, [finished, finished.rstrip("."), "Too short."])
    assert scores[0] - scores[1] == pytest.approx(50.0)   # a reply cut off mid-sentence loses 50
    assert scores[2] == -100.0
