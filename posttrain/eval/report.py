"""`posttrain report`: one self-contained HTML file of training runs and evals.

It opens with the notes' example prompt and each model's answer to it (from the eval files),
then each eval's table (win rates with their intervals, length-controlled win rates, KL,
lengths), a plot of the win rates, the judge and whether it took part in training, and every
prompt's answers side by side (the baseline's before, each model's after); then each run's
curves from RUN_DIR/metrics.jsonl, whatever keys the trainer logged, grouped by quantity.

Self-contained: plots are PNGs inline as base64 data URIs and the styles are inline, so the
file opens anywhere with no network. Every piece of text from a model or a file is escaped
(Jinja2 autoescape): a model that writes "<script>" shows those characters.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path

from jinja2 import Environment

from posttrain.eval.format import FORMAT, SHOWCASE_PROMPT, write_text_atomic

GROUPS = (
    ("Loss", lambda k: k == "loss" or k.startswith("loss/")),
    ("Learning rate", lambda k: k == "optim/lr"),
    ("Gradient norm", lambda k: k == "optim/grad_norm"),
    ("Accuracy", lambda k: "accuracy" in k),
    ("Rewards and margins", lambda k: k.startswith("rewards/") or "margin" in k),
    ("KL", lambda k: "kl" in k.split("/")[-1] or k.startswith("kl/")),
    ("Objective and scores", lambda k: k.startswith("objective/")),
    ("Response length", lambda k: "response_length" in k),
)
"""(title, test on a metric key with any "eval/" prefix removed): the first group whose test
passes takes the key, so a held-out eval/loss is drawn beside the training loss. Keys no group
takes are drawn by their prefix ("perf", "policy", "logps", ...)."""


def read_metrics(run_dir: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} of RUN_DIR/metrics.jsonl (one JSON object with a "step" a line, as
    every trainer writes it), numeric keys only, steps ascending; a step logged twice (a resumed
    run) keeps its last value. ValueError naming the file and line of anything else."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ValueError(f"run {run_dir}: no such folder")
    if not path.is_file():
        raise ValueError(f"run {run_dir}: no metrics.jsonl (is it a training output folder?)")
    by_key: dict[str, dict[float, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise ValueError(f"{path}: line {number}: expected an object with a numeric 'step'")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[record["step"]] = float(value)
    curves = {}
    for key, points in by_key.items():
        steps = sorted(points)
        if any(math.isfinite(points[s]) for s in steps):
            curves[key] = (steps, [points[s] for s in steps])
    return curves


def group_keys(keys: list[str]) -> list[tuple[str, list[str]]]:
    """[(title, keys)] in GROUPS order, then the other prefixes alphabetically; keys sorted."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        bare = key.removeprefix("eval/")
        title = next((t for t, test in GROUPS if test(bare)), None) or bare.split("/")[0]
        groups.setdefault(title, []).append(key)
    order = [t for t, _ in GROUPS]
    return sorted(groups.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_curves(title: str, curves: dict[str, tuple[list[float], list[float]]], keys: list[str]) -> str:
    """A base64 PNG of `keys`' curves against the step, held-out (eval/) ones dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.add_subplot()
    for key in keys:
        steps, values = curves[key]
        ax.plot(steps, values, "--" if key.startswith("eval/") else "-", marker="o" if len(steps) < 15 else None,
                markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_win_rates(result: dict) -> str:
    """A base64 PNG: each model's win rate and length-controlled win rate with their intervals,
    against the line of no difference at 0.5."""
    from matplotlib.figure import Figure

    models = result["models"]
    fig = Figure(figsize=(6.0, 0.6 + 0.55 * len(models)))
    ax = fig.add_subplot()
    for offset, key, interval, name in ((0.12, "win_rate", "win_interval", "win rate"),
                                        (-0.12, "lc_win_rate", "lc_interval", "length-controlled")):
        centres = [m["vs_baseline"][key] for m in models]
        lows = [c - m["vs_baseline"][interval][0] for c, m in zip(centres, models)]
        highs = [m["vs_baseline"][interval][1] - c for c, m in zip(centres, models)]
        ax.errorbar(centres, [i + offset for i in range(len(models))], xerr=[lows, highs], fmt="o", capsize=3,
                    label=name)
    ax.axvline(0.5, color="grey", linestyle=":")
    ax.set_yticks(range(len(models)), [m["label"] for m in models])
    ax.set_xlim(0, 1)
    ax.set_ylim(len(models) - 0.5, -0.5)  # the first model on top, each row half a unit of margin
    ax.set_xlabel(f"vs {result['baseline']['label']} ({result['confidence']:.0%} intervals)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def read_eval(path: str | os.PathLike) -> dict:
    """An eval.json written by `posttrain eval`; ValueError naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--eval {path}: no such file")
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--eval {path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(result, dict):
        raise ValueError(f"--eval {path}: a JSON {type(result).__name__}, expected an object (an eval.json of "
                         "`posttrain eval`)")
    if result.get("format") != FORMAT:
        found = result.get("format")
        raise ValueError(f"--eval {path}: field 'format' is {found!r}, expected {FORMAT!r} (an eval.json of "
                         "`posttrain eval`)")
    problem = eval_shape_problem(result)
    if problem:
        raise ValueError(f"--eval {path}: {problem}")
    return result


NUMBER, OPTIONAL_NUMBER, TEXT, COUNT = (int, float), (int, float, type(None)), (str,), (int,)
OBJECT, LIST, FLAG, PAIR = (dict,), (list,), (bool,), "pair"
EXPECTED = {NUMBER: "a number", OPTIONAL_NUMBER: "a number or null", TEXT: "a string", COUNT: "an integer",
            OBJECT: "an object", LIST: "a list", FLAG: "true or false", PAIR: "a list of two numbers"}
RESULT_FIELDS = {"prompts": COUNT, "n_samples": COUNT, "confidence": NUMBER, "judge": OBJECT, "baseline": OBJECT,
                 "models": LIST, "samples": LIST, "sampling": OBJECT}
JUDGE_FIELDS = {"spec": TEXT, "used_in_training": FLAG}
MODEL_FIELDS = {"label": TEXT, "model": TEXT, "mean_length_tokens": NUMBER, "mean_length_chars": NUMBER,
                "eos_rate": NUMBER, "mean_score": OPTIONAL_NUMBER}
COMPARISON_FIELDS = {"win_rate": NUMBER, "win_interval": PAIR, "lc_win_rate": NUMBER, "lc_interval": PAIR,
                     "wins": COUNT, "ties": COUNT, "losses": COUNT, "kl": OPTIONAL_NUMBER,
                     "kl_standard_error": OPTIONAL_NUMBER, "kl_sequences": COUNT, "kl_note": TEXT}
"""The eval.json fields the report reads, with their types (eval.run's dataclasses)."""


def _field_problem(value: dict, fields: dict, where: str) -> str | None:
    for name, kind in fields.items():
        found = value.get(name, ...)
        if kind == PAIR:
            ok = isinstance(found, list) and len(found) == 2 and all(_is(x, NUMBER) for x in found)
        else:
            ok = found is not ... and _is(found, kind)
        if not ok:
            shown = "missing" if found is ... else repr(found)[:60]
            return f"field '{where}{name}' is {shown}, expected {EXPECTED[kind]}"
    return None


def _is(value, kind: tuple) -> bool:
    """isinstance, except that true/false is no number (bool is an int in Python)."""
    return isinstance(value, kind) and (kind == FLAG or not isinstance(value, bool))


def eval_shape_problem(result: dict) -> str | None:
    """What in an eval.json dict the report cannot read (the first problem, naming its field), or
    None: the fields the page shows, with their types."""
    problem = (_field_problem(result, RESULT_FIELDS, "") or _field_problem(result["judge"], JUDGE_FIELDS, "judge.")
               or _field_problem(result["baseline"], MODEL_FIELDS, "baseline."))
    if problem:
        return problem
    if not result["models"]:
        return "field 'models' is empty, expected the evaluated models"
    for i, model in enumerate(result["models"]):
        if not isinstance(model, dict):
            return f"field 'models[{i}]' is {repr(model)[:60]}, expected an object"
        problem = (_field_problem(model, {**MODEL_FIELDS, "vs_baseline": OBJECT}, f"models[{i}].")
                   or _field_problem(model["vs_baseline"], COMPARISON_FIELDS, f"models[{i}].vs_baseline."))
        if problem:
            return problem
    return None


def showcase_answers(evals: list[dict]) -> list[dict]:
    """[{label, model, answer}] to SHOWCASE_PROMPT from the evals, each (label, model) once, in order."""
    seen, out = set(), []
    for result in evals:
        showcase = result.get("showcase") or {}
        if showcase.get("prompt") != SHOWCASE_PROMPT:
            continue
        for row in [result["baseline"], *result["models"]]:
            key = (row["label"], row["model"])
            if key not in seen and showcase["answers"].get(row["label"]) is not None:
                seen.add(key)
                out.append({"label": row["label"], "model": row["model"], "answer": showcase["answers"][row["label"]]})
    return out


def render_report(runs: dict[str, dict], evals: dict[str, dict], *, title: str = "posttrain report") -> str:
    """The HTML page: runs {name: read_metrics(...)}, evals {name: read_eval(...)}."""
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    plotted_runs = [{"name": name, "plots": [{"title": t, "png": plot_curves(t, curves, keys)}
                                             for t, keys in group_keys(list(curves))]}
                    for name, curves in runs.items()]
    plotted_evals = [{"name": name, "result": result, "plot": plot_win_rates(result),
                      "labels": [result["baseline"]["label"], *(m["label"] for m in result["models"])]}
                     for name, result in evals.items()]
    return env.from_string(TEMPLATE).render(title=title, prompt=SHOWCASE_PROMPT,
                                            showcase=showcase_answers(list(evals.values())),
                                            runs=plotted_runs, evals=plotted_evals)


def write_report(run_dirs: list[str | os.PathLike] | dict[str, str] = (),
                 evals: list[str | os.PathLike] | dict[str, str] = (), *, output: str | os.PathLike,
                 title: str = "posttrain report") -> Path:
    """Read every run folder and eval file (ValueError naming the first bad one; nothing written
    then), render the page and write it to `output` (a file in a folder that exists) via a
    temporary file renamed into place. Returns the path. A mapping {name: path} names each run
    or eval in the page (recipes do so); a list names them by their paths."""
    out = Path(output)
    if not run_dirs and not evals:
        raise ValueError("nothing to report: give RUN_DIRs and/or --eval files")
    if out.is_dir():
        raise ValueError(f"--output {output} is a folder; expected a file name")
    if not out.parent.is_dir():
        raise ValueError(f"--output {output}: folder {out.parent} does not exist")
    named_runs = run_dirs if isinstance(run_dirs, dict) else {str(d): d for d in run_dirs}
    named_evals = evals if isinstance(evals, dict) else {str(e): e for e in evals}
    inputs = [Path(e) for e in named_evals.values()] + [Path(d) / "metrics.jsonl" for d in named_runs.values()]
    for path in inputs:
        if path.resolve() == out.resolve():
            raise ValueError(f"--output {output} is one of the report's inputs ({path}); choose another file")
    runs = {name: read_metrics(d) for name, d in named_runs.items()}
    results = {name: read_eval(e) for name, e in named_evals.items()}
    page = render_report(runs, results, title=title)
    write_text_atomic(out, page)
    print(f"wrote {out} ({len(runs)} runs, {len(results)} evals, {len(page) // 1024} KiB)")
    return out


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; }
.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; max-width: 40em; }
.prompt { font-size: 1.15em; font-style: italic; }
.warn { background: #fde8e8; border-left: 4px solid #c00; padding: 0.5em 1em; }
.ok { background: #e8f4e8; border-left: 4px solid #393; padding: 0.5em 1em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
.win { background: #e8f4e8; } .loss { background: #fde8e8; }
.muted { color: #777; }
</style></head>
<body>
{% macro answer(text) %}
{% if text.strip() %}{{ text }}
{%- else %}<span class="muted">(empty{{ " or whitespace only" if text }})</span>{% endif %}
{% endmacro %}
<h1>{{ title }}</h1>
<section id="showcase">
<h2>Example</h2>
<p class="prompt">{{ prompt }}</p>
{% if showcase %}
<p class="muted">Each model's answer as <code>posttrain eval</code> sampled it, with its eval's settings.</p>
<table><tr><th>model</th><th>answer</th></tr>
{% for row in showcase %}
<tr><td>{{ row.label }}<br><span class="muted">{{ row.model }}</span></td>
<td class="answer">{{ answer(row.answer) }}</td></tr>
{% endfor %}
</table>
{% else %}
<p class="muted">No answers: give an eval.json of <code>posttrain eval</code> (--eval) to show each model's.</p>
{% endif %}
</section>
{% for ev in evals %}
{% set r = ev.result %}
<section class="eval">
<h2>Eval: {{ r.models | map(attribute="label") | join(", ") }} vs {{ r.baseline.label }}</h2>
<p class="muted">{{ ev.name }} · {{ r.prompts }} prompts × {{ r.n_samples }} answer{{ "s" if r.n_samples > 1 }} ·
{{ "greedy" if r.sampling.temperature == 0 else "temperature %g" % r.sampling.temperature }},
at most {{ r.sampling.max_new_tokens }} tokens · intervals: {{ r.intervals }} ·
length control: {{ r.length_control }}</p>
<p>Judge: <code>{{ r.judge.spec }}</code>{% if r.judge.rubric %} (rubric {{ r.judge.rubric }}){% endif %}.</p>
{% if r.judge.used_in_training %}
<p class="warn">This judge took part in building the training data or rewards of an evaluated model: a model
trained toward it will score well on it, so these win rates are not independent evidence.</p>
{% else %}
<p class="ok">This judge took no part in building the training data or rewards of the evaluated models (as
recorded by whoever ran the eval).</p>
{% endif %}
<table>
<tr><th>model</th><th>win rate</th><th>{{ "%.0f" % (r.confidence * 100) }} % interval</th><th>LC win rate</th>
<th>{{ "%.0f" % (r.confidence * 100) }} % interval</th><th>W / T / L</th><th>mean score</th>
<th>KL(model‖{{ r.baseline.label }})</th><th>length (tokens)</th><th>EOS rate</th></tr>
{% for m in r.models + [r.baseline] %}
{% set c = m.vs_baseline %}
<tr><td>{{ m.label }}{% if not c %} (baseline){% endif %}<br><span class="muted">{{ m.model }}</span></td>
{% if c %}
<td class="num">{{ "%.3f" % c.win_rate }}</td>
<td class="num">[{{ "%.3f" % c.win_interval[0] }}, {{ "%.3f" % c.win_interval[1] }}]</td>
<td class="num">{{ "%.3f" % c.lc_win_rate }}</td>
<td class="num">[{{ "%.3f" % c.lc_interval[0] }}, {{ "%.3f" % c.lc_interval[1] }}]</td>
<td class="num">{{ c.wins }} / {{ c.ties }} / {{ c.losses }}</td>
{% else %}
<td class="muted" colspan="5">—</td>
{% endif %}
<td class="num">{{ "—" if m.mean_score is none else "%.4g" % m.mean_score }}</td>
<td class="num">
{% if c and c.kl is not none %}
{{ "%.3g" % c.kl }} ± {{ "%.2g" % c.kl_standard_error }} <span class="muted">({{ c.kl_sequences }} seq.)</span>
{% elif c %}<span class="muted">{{ c.kl_note }}</span>{% else %}—{% endif %}
</td>
<td class="num">{{ "%.1f" % m.mean_length_tokens }}</td><td class="num">{{ "%.0f" % (m.eos_rate * 100) }} %</td></tr>
{% endfor %}
</table>
<ul class="verdicts">
{% for m in r.models %}{% set c = m.vs_baseline %}
<li>{{ m.label }}: {% if c.win_interval[0] > 0.5 %}<b>better</b> than {{ r.baseline.label }} by this judge (the whole
{{ "%.0f" % (r.confidence * 100) }} % interval is above 0.5){% elif c.win_interval[1] < 0.5 %}<b>worse</b> than
{{ r.baseline.label }} by this judge (the whole interval is below 0.5){% else %}<b>no measurable difference</b> from
{{ r.baseline.label }} by this judge (the interval holds 0.5){% endif %}.</li>
{% endfor %}
</ul>
<img src="data:image/png;base64,{{ ev.plot }}" alt="win rates of {{ ev.name }}">
<details open><summary>Answers side by side ({{ r.samples | length }} prompts; first answer each; green: the judge
preferred the model's answer, red: the baseline's)</summary>
<table>
<tr><th>prompt</th>
{% for label in ev.labels %}<th>{{ label }}{% if loop.first %} (baseline){% endif %}</th>{% endfor %}
</tr>
{% for s in r.samples %}
<tr><td class="answer">{{ s.prompt }}</td>
{% for label in ev.labels %}
{% set o = s.outcomes[label][0] if label in s.outcomes else none %}
<td class="answer {{ 'win' if o == 1 else ('loss' if o == 0 else '') }}">{{ answer(s.answers[label][0]) }}</td>
{% endfor %}
</tr>
{% endfor %}
</table>
</details>
</section>
{% endfor %}
{% for run in runs %}
<section class="run">
<h2>Run: {{ run.name }}</h2>
{% if run.plots %}
<div class="plots">
{% for p in run.plots %}<img src="data:image/png;base64,{{ p.png }}" alt="{{ p.title }} of {{ run.name }}">{% endfor %}
</div>
{% else %}
<p class="muted">metrics.jsonl holds no numeric metric.</p>
{% endif %}
</section>
{% endfor %}
</body></html>
"""
