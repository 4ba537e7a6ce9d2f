"""`posttrain report`: the metrics of a run grouped into plots, the eval tables, and the page
rendered in headless Chromium — every plot loaded, hostile model text shown as text, nothing
fetched from a network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.eval.format import SHOWCASE_PROMPT
from posttrain.eval.report import group_keys, read_metrics
from posttrain.eval.run import evaluate
from posttrain.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __name__
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">&amp; "quoted"'


def lengths(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def write_metrics(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def dpo_like_run(folder: Path) -> Path:
    """The keys `posttrain dpo` logs (train lines, then held-out eval/ lines), a resumed step
    written twice and a NaN grad norm (max_grad_norm 0)."""
    rows = [{"step": s, "loss/train": 0.69 - 0.02 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
             "rewards/accuracy": 0.5 + 0.02 * s, "rewards/margin": 0.02 * s, "logps/chosen": -50.0 + s,
             "perf/pairs_per_s": 3.0, "optim/lr": 1e-6 * min(1, s / 3), "optim/grad_norm": float("nan")}
            for s in range(1, 9)]
    rows += [{"step": 8, "eval/loss": 0.6, "eval/rewards/accuracy": 0.6, "eval/rewards/margin": 0.1},
             {"step": 4, "loss/train": 0.5}]                                   # step 4 again, after a resume
    return write_metrics(folder, rows)


def ppo_like_run(folder: Path) -> Path:
    return write_metrics(folder, [{"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.01 * s,
                                   "policy/approx_kl": 0.001, "policy/clipfrac": 0.1, "loss/policy": -0.1,
                                   "loss/value": 0.5, "rollout/response_length": 40 - s, "optim/lr": 1e-6}
                                  for s in range(6)])


def test_read_metrics_keeps_numeric_keys_and_the_last_value_of_a_step(tmp_path):
    curves = read_metrics(dpo_like_run(tmp_path / "dpo"))
    assert curves["loss/train"][0] == list(range(1, 9))
    assert curves["loss/train"][1][3] == 0.5                                  # the resumed run's value of step 4
    assert curves["eval/loss"] == ([8], [0.6])
    assert "optim/grad_norm" not in curves                                    # never a finite value: nothing to draw


def test_keys_are_grouped_by_quantity_with_their_held_out_twins():
    keys = ["loss/train", "eval/loss", "loss/policy", "optim/lr", "optim/grad_norm", "rewards/accuracy",
            "eval/rewards/accuracy", "rewards/margin", "rewards/chosen", "objective/kl", "policy/approx_kl", "kl/z0",
            "objective/scores", "rollout/response_length", "eval/response_length", "perf/pairs_per_s", "value/vpred"]
    assert group_keys(keys) == [
        ("Loss", ["eval/loss", "loss/policy", "loss/train"]), ("Learning rate", ["optim/lr"]),
        ("Gradient norm", ["optim/grad_norm"]), ("Accuracy", ["eval/rewards/accuracy", "rewards/accuracy"]),
        ("Rewards and margins", ["rewards/chosen", "rewards/margin"]),
        ("KL", ["kl/z0", "objective/kl", "policy/approx_kl"]), ("Objective and scores", ["objective/scores"]),
        ("Response length", ["eval/response_length", "rollout/response_length"]),
        ("perf", ["perf/pairs_per_s"]), ("value", ["value/vpred"])]


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "no metrics.jsonl"),
    (lambda d: (write_metrics(d, []) / "metrics.jsonl").write_text('{"step": 1}\nnot json\n'),
     "line 2: not JSON"),
    (lambda d: write_metrics(d, [{"loss": 1.0}]), "line 1: expected an object with a numeric 'step'"),
])
def test_bad_run_folders_fail_in_one_line_and_write_nothing(make, message, tmp_path, capsys):
    make(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("posttrain report: error: ") and message in err
    assert not (tmp_path / "r.html").exists()


def test_an_eval_file_of_another_format_is_refused(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    assert main(["report", "--eval", str(tmp_path / "x.json"), "--output", str(tmp_path / "r.html")]) == 2
    assert "field 'format' is 'something-else'" in capsys.readouterr().err


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    """A real eval.json of the tiny model against itself, then a hostile answer and prompt
    written into it, as a model could have produced them."""
    out = tmp_path / "eval"
    evaluate({"tuned": "tiny-random"}, "tiny-random", _prompts(tmp_path), f"fn:{HERE}:lengths",
             baseline_label="start", output_dir=out, params=SamplingParams(temperature=0.0, max_new_tokens=10),
             precision="fp32")
    result = json.loads((out / "eval.json").read_text())
    result["samples"][0]["answers"]["tuned"][0] = HOSTILE
    result["samples"][1]["prompt"] = HOSTILE
    result["showcase"]["answers"]["tuned"] = "Once upon a time…\n" + HOSTILE
    (out / "eval.json").write_text(json.dumps(result))
    return out / "eval.json"


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("models"), "field 'models' is missing, expected a list"),
    (lambda r: r.update(models="x"), "field 'models' is 'x', expected a list"),
    (lambda r: r.update(judge="<str>"), "field 'judge' is '<str>', expected an object"),
    (lambda r: r["models"][0].update(vs_baseline=None), "field 'models[0].vs_baseline' is None, expected an object"),
    (lambda r: r["models"][0]["vs_baseline"].update(win_rate="high"),
     "field 'models[0].vs_baseline.win_rate' is 'high', expected a number"),
    (lambda r: r["models"][0]["vs_baseline"].update(win_interval=[0.1]),
     "field 'models[0].vs_baseline.win_interval' is [0.1], expected a list of two numbers"),
    (lambda r: r.update(confidence="abc"), "field 'confidence' is 'abc', expected a number"),
    (lambda r: r["judge"].update(used_in_training="no"), "field 'judge.used_in_training' is 'no', expected true or false"),
])
def test_an_eval_file_the_report_cannot_read_is_named_with_its_field(damage, message, eval_file, tmp_path, capsys):
    result = json.loads(eval_file.read_text())
    damage(result)
    eval_file.write_text(json.dumps(result))
    assert main(["report", "--eval", str(eval_file), "--output", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert f"--eval {eval_file}: {message}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.html").exists()


def test_a_json_list_is_no_eval_file(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["report", "--eval", str(tmp_path / "x.json"), "--output", str(tmp_path / "r.html")]) == 2
    assert "a JSON list, expected an object" in capsys.readouterr().err


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Explain thing {i} simply."}) + "\n" for i in range(4)))
    return data


def test_report_renders_in_chromium_with_every_plot_and_escaped_text(browser, artifacts_dir, eval_file, tmp_path,
                                                                     capsys):
    runs = [dpo_like_run(tmp_path / "dpo"), ppo_like_run(tmp_path / "ppo")]
    output = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--eval", str(eval_file), "--output", str(output)]) == 0
    assert f"wrote {output} (2 runs, 1 evals" in capsys.readouterr().out
    page = output.read_text()
    # Self-contained: no stylesheet, script or image is fetched from anywhere.
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page

    browser.get(output.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    # dpo: Loss, Learning rate, Accuracy, Rewards and margins, logps, perf (grad norm all NaN);
    # ppo: Loss, Learning rate, KL, Objective and scores, Response length, policy (clipfrac);
    # 1 win-rate plot. The hostile text's <img> is text, not a 13th image.
    assert len(images) == 6 + 6 + 1, images
    for alt, complete, width, height in images:
        assert complete and width > 0 and height > 0, alt
    assert browser.execute_script("return window.__pwned") is None           # nothing the model wrote ran
    text = browser.find_element("tag name", "body").text
    assert HOSTILE in text                                                    # shown, character for character
    assert text.index(SHOWCASE_PROMPT) < text.index("Eval: tuned vs start") < text.index("Run: ")
    showcase = browser.find_element("id", "showcase").text
    assert "Once upon a time…" in showcase and "start" in showcase and "tuned" in showcase
    assert "took no part in building the training data" in text
    # Against itself every answer ties: the interval is [0.5, 0.5] and the page says so in words.
    assert "tuned: no measurable difference from start by this judge (the interval holds 0.5)." in text

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 100, 6000))
    try:
        browser.save_screenshot(str(artifacts_dir / "report.png"))
    finally:
        browser.set_window_size(1280, 900)


def test_nothing_to_report_or_an_output_folder_is_refused(tmp_path, capsys):
    assert main(["report", "--output", str(tmp_path / "r.html")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    run = ppo_like_run(tmp_path / "ppo")
    assert main(["report", str(run), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["report", str(run), "--output", str(tmp_path / "missing" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("interval, words", [((0.55, 0.8), "tuned: better than start by this judge"),
                                             ((0.1, 0.45), "tuned: worse than start by this judge"),
                                             ((0.45, 0.55), "tuned: no measurable difference from start")])
def test_the_report_says_in_words_whether_the_interval_clears_one_half(eval_file, interval, words):
    import html
    import re

    from posttrain.eval.report import read_eval, render_report

    result = read_eval(eval_file)
    result["models"][0]["vs_baseline"]["win_interval"] = list(interval)
    result["models"][0]["vs_baseline"]["win_rate"] = sum(interval) / 2   # the plot draws the interval around it
    text = html.unescape(re.sub(r"<[^>]+>", "", render_report({}, {"eval": result})))
    assert words in " ".join(text.split())



def test_the_report_never_overwrites_its_inputs(eval_file, tmp_path, capsys):
    run = dpo_like_run(tmp_path / "dpo")
    before = eval_file.read_bytes(), (run / "metrics.jsonl").read_bytes()
    assert main(["report", "--eval", str(eval_file), "--output", str(eval_file)]) == 2
    assert main(["report", str(run), "--output", str(run / "metrics.jsonl")]) == 2
    assert "is one of the report's inputs" in capsys.readouterr().err
    assert (eval_file.read_bytes(), (run / "metrics.jsonl").read_bytes()) == before
