"""The `posttrain eval` and `posttrain report` commands: their flags and what runs them.

Imported when the parser is built, so it imports nothing heavy at the top: the eval run and the
report load torch, scipy and matplotlib only when their command runs.
"""

from __future__ import annotations

from importlib import import_module


def add_eval_parser(sub) -> None:
    """`posttrain eval`: models against a baseline on held-out prompts."""
    from posttrain.cli import OneDefaultHelpFormatter, YesNoFlag, add_sampling_flags

    p = sub.add_parser("eval", help="Win rates (with intervals), length-controlled win rates, KL and lengths of "
                       "models against a baseline, judged pairwise.", formatter_class=OneDefaultHelpFormatter)
    # "MODEL", not "[LABEL=]MODEL": argparse cannot wrap a usage line whose metavars hold brackets.
    p.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="a model to evaluate: built-in name, HF id or folder, optionally labelled LABEL=MODEL "
                        "(repeat for more)")
    p.add_argument("--baseline", action="append", required=True, metavar="MODEL",
                   help="the model every answer is judged against; repeat to judge against several in one run "
                        "(each model's answers sampled once; then each baseline's eval goes to OUTPUT_DIR/LABEL/)")
    p.add_argument("--data", required=True, help="prompt records {prompt} or {messages} ending in a user turn")
    p.add_argument("--judge", required=True, metavar="SPEC",
                   help="rm:PATH | fn:module:function (higher score wins) | llm:MODEL (pairwise, both orders)")
    p.add_argument("--output-dir", required=True, help="folder for eval.json and eval.md (created)")
    p.add_argument("--n-samples", type=int, default=1, help="answers per prompt and model (> 1 needs a --temperature)")
    p.add_argument("--judge-used-in-training", action=YesNoFlag, default=False,
                   help="record that this judge built the training data or rewards of an evaluated model")
    p.add_argument("--kl-samples", type=int, default=1,
                   help="temperature-1 samples per prompt for KL(model‖baseline) when the answers are not such "
                        "samples themselves (0: no KL)")
    p.add_argument("--rubric", default=None, metavar="FILE", help="llm: judge prompt template (default: built in)")
    p.add_argument("--tie-margin", type=float, default=None,
                   help="llm: a tie when the two orders' preferences differ by more (default: 0.5)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap intervals")
    add_sampling_flags(p, temperature=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded or scored together")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are left out and counted")


def labelled(value: str) -> tuple[str, str]:
    """"LABEL=MODEL" -> (LABEL, MODEL); a value whose part before "=" is empty or holds a "/" (a
    path) is a model labelled by itself."""
    label, sep, model = value.partition("=")
    if sep and label.strip() and "/" not in label and model.strip():
        return label.strip(), model.strip()
    return value, value


def labelled_all(flag: str, values: list[str]) -> dict[str, str]:
    """{label: model} of a repeated flag's values; ValueError for a label given twice, or a blank
    label or model (" =m", "a= ", a zero-width space: a row of the table named by nothing)."""
    from posttrain.data.errors import is_blank

    named: dict[str, str] = {}
    for value in values:
        label, sep, model = value.partition("=")
        if sep and "/" not in label and (is_blank(label) or is_blank(model)):
            raise ValueError(f"{flag} {value!r}: {'label' if is_blank(label) else 'model'} is blank; "
                             "give LABEL=MODEL or MODEL")
        label, model = labelled(value)   # (a wholly blank value is refused as the line is parsed)
        if label in named:
            raise ValueError(f"{flag} {value}: label {label!r} is given twice; label them LABEL=MODEL")
        named[label] = model
    return named


def run_eval(args) -> None:
    from posttrain.cli import sampling_params

    models, baselines = labelled_all("--model", args.model), labelled_all("--baseline", args.baseline)
    run = import_module("posttrain.eval.run")
    options = dict(output_dir=args.output_dir, n_samples=args.n_samples, params=sampling_params(args),
                   judge_used_in_training=args.judge_used_in_training, kl_samples=args.kl_samples,
                   batch_size=args.batch_size, precision=args.precision, max_prompt_length=args.max_prompt_length,
                   rubric=args.rubric, tie_margin=args.tie_margin, confidence=args.confidence)
    if len(baselines) == 1:
        (label, model), = baselines.items()
        run.evaluate(models, model, args.data, args.judge, baseline_label=label, **options)
    else:
        run.evaluate_many(models, baselines, args.data, args.judge, **options)


def add_report_parser(sub) -> None:
    """`posttrain report`: one self-contained HTML page of runs and evals."""
    from posttrain.cli import OneDefaultHelpFormatter

    p = sub.add_parser("report", help="One self-contained HTML file: each run's training curves, eval tables "
                       "with intervals, and the models' answers side by side.", formatter_class=OneDefaultHelpFormatter)
    # None, not [], as the unset default: the help then shows no "(default: [])".
    p.add_argument("runs", nargs="*", default=None, metavar="RUN_DIR",
                   help="training output folders holding metrics.jsonl")
    p.add_argument("--eval", action="append", default=None, metavar="EVAL.json", dest="evals",
                   help="an eval.json from `posttrain eval` (repeat for more)")
    p.add_argument("--output", required=True, help="the HTML file to write, in a folder that exists")
    p.add_argument("--title", default="posttrain report", help="the page's title")


def run_report(args) -> None:
    import_module("posttrain.eval.report").write_report(args.runs or [], args.evals or [], output=args.output,
                                                        title=args.title)
