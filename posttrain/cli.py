"""The `posttrain` command: parse flags, build a config, call a trainer. Nothing more.

Every trainer command's flags are generated from its config dataclass (name, type, default
and the docstring under the field), so --help and the YAML keys can never drift apart.
Trainer modules are imported only when their command runs, which keeps --help instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from importlib import import_module

from posttrain.config import BOOL_WORDS, CONFIGS, build_config, field_docs, field_types

TRAINERS = {"sft": "posttrain.trainers.sft", "rm": "posttrain.trainers.reward", "dpo": "posttrain.trainers.dpo",
            "ppo": "posttrain.trainers.ppo", "grpo": "posttrain.trainers.grpo", "rloo": "posttrain.trainers.grpo",
            "kto": "posttrain.trainers.kto"}
"""Command → module whose `train(cfg)` runs it."""

def _typed(kind: type, name: str):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not a valid {kind.__name__}") from None
    parse.__name__ = kind.__name__
    return parse


class YesNoFlag(argparse.BooleanOptionalAction):
    """--flag / --no-flag for a bool field, as argparse's BooleanOptionalAction, that also reads a
    word written after --flag (true/false, yes/no, on/off, 1/0): `--flag maybe` is then an error
    naming the flag, not argparse's "unrecognized arguments: maybe" naming nothing."""

    WORDS = BOOL_WORDS

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.nargs = "?"

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return super().__call__(parser, namespace, values, option_string)
        yes, no = self.option_strings
        word = self.WORDS.get(values.strip().lower())
        if word is None or option_string == no:
            raise argparse.ArgumentError(self, f"{values!r} is not a value this flag takes: write {yes} or {no} "
                                               f"(or {yes} true|false)")
        setattr(namespace, self.dest, word)


class YesNoHelpFormatter(argparse.HelpFormatter):
    """Help and usage show a YesNoFlag as the pair it is (--flag, --no-flag), as argparse shows
    its own BooleanOptionalAction; the optional word after --flag is for scripts."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, YesNoFlag):  # help lists "--flag [true|false], --no-flag"
            yes, no = action.option_strings
            return f"{yes} [true|false], {no}"
        return super()._format_action_invocation(action)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, YesNoFlag):  # usage writes "<first option> <this>"
            return "| " + action.option_strings[1]
        return super()._format_args(action, default_metavar)


class YesNoDefaultsHelpFormatter(YesNoHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """YesNoHelpFormatter that also adds "(default: …)" to each flag's help."""


class OneDefaultHelpFormatter(YesNoHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: …)" to a flag's help unless the help already says its default (a None
    that stands for "built in", "stdout", "all"), the flag is required, or its default is None
    (unset): each flag shows one true default or none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.required or action.default is None:
            return text
        return super()._get_help_string(action)


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; unset flags stay absent so YAML values are not overridden."""
    docs, kinds = field_docs(cls), field_types(cls)
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of config values; flags given here override it")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default!r})"
        if kinds[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=YesNoFlag, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_typed(kinds[f.name], f.name),
                                default=argparse.SUPPRESS, metavar=kinds[f.name].__name__.upper(),
                                help=help_text)


def add_sampling_flags(parser: argparse.ArgumentParser, *, temperature: float) -> None:
    """The sampler's settings (posttrain.sampling.SamplingParams) and precision."""
    parser.add_argument("--max-new-tokens", type=int, default=128, help="response tokens at most")
    parser.add_argument("--temperature", type=float, default=temperature, help="softmax temperature; 0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--stop-strings", default="",
                        help="also stop at any of these strings, separated by '|' (the reply keeps the stop string)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every sequence's random stream")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="dtype of the sampler's weights")


def sampling_params(args, n: int = 1):
    from posttrain.sampling import SamplingParams

    return SamplingParams(n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop_strings=tuple(s for s in args.stop_strings.split("|") if s),
                          seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also POSTTRAIN_DEBUG=1); may follow the command")
    # Not required here: parse_command_line asks for it after naming any unrecognized argument.
    sub = parser.add_subparsers(dest="command", required=False, metavar="COMMAND")
    for name, cls in CONFIGS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0], formatter_class=YesNoHelpFormatter)
        add_config_flags(p, cls)

    gen = sub.add_parser("generate", help="Chat-formatted replies from any model or output folder.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF id or folder")
    gen.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
    gen.add_argument("--system", default=None, help="optional system message")
    add_sampling_flags(gen, temperature=0.0)

    sample = sub.add_parser("sample", help="K sampled responses per prompt record, appended to a JSONL file.",
                            formatter_class=YesNoDefaultsHelpFormatter)
    sample.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF id or folder")
    sample.add_argument("--data", required=True, help="prompt records {prompt} or {messages} ending in a user turn")
    sample.add_argument("--output", required=True, help="samples JSONL; an existing one of the same settings is continued")
    sample.add_argument("--n", type=int, default=4, help="responses per prompt")
    add_sampling_flags(sample, temperature=1.0)
    sample.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    sample.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are left out and counted")
    # Read as the trainers' --skip-invalid is (a word after it too).
    sample.add_argument("--skip-invalid", action=YesNoFlag, default=False,
                        help="drop invalid records (counted) instead of stopping")

    specs = "rm:PATH (reward model folder) | fn:module:function (reward function) | llm:MODEL (LLM judge, pairs)"
    score = sub.add_parser("score", help="One score per (prompt, response) record (rm: or fn: judge).",
                           formatter_class=OneDefaultHelpFormatter)
    score.add_argument("--judge", default=None, metavar="SPEC", help="rm:PATH | fn:module:function")
    score.add_argument("--model", default=None, help="reward model folder; short for --judge rm:MODEL")
    score.add_argument("--data", required=True,
                       help="records {prompt, response} or {messages} ending in an assistant turn")
    score.add_argument("--output", default=None,
                       help="JSONL file, in a folder that exists, for the records with a 'score' (default: stdout)")
    score.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    score.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="compute precision")

    judge = sub.add_parser("judge", help="Scored lists (rm:, fn:) or preference pairs (llm:) from a samples file.",
                           formatter_class=OneDefaultHelpFormatter)
    judge.add_argument("--data", required=True, help="samples JSONL: {prompt, responses, finish_reasons?} records")
    judge.add_argument("--judge", required=True, metavar="SPEC", help=specs)
    judge.add_argument("--output", required=True,
                       help="JSONL for `posttrain rm` / `posttrain dpo`, in a folder that exists")
    judge.add_argument("--rubric", default=None, metavar="FILE",
                       help="llm: prompt template with {prompt}, {response_a}, {response_b} (default: built in)")
    judge.add_argument("--pairing", default=None, choices=("all", "best_vs_rest", "best_vs_worst"),
                       help="llm: which judged pairs to write (default: all)")
    judge.add_argument("--min-score-gap", type=float, default=None,
                       help="llm: drop pairs whose preference is within this of 0.5 (default: 0)")
    judge.add_argument("--tie-margin", type=float, default=None,
                       help="llm: a tie when the two orders' preferences differ by more (default: 0.5)")
    judge.add_argument("--keep-all", action=YesNoFlag, default=False,
                       help="rm/fn: also write records whose scores form no pair (one reply, all equal), for "
                            "`posttrain best-of-n`; `posttrain rm` / `dpo` refuse them")
    judge.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    judge.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="compute precision")

    best = sub.add_parser("best-of-n", help="SFT records from scored lists: the best reply per prompt, or every "
                          "reply above a threshold.", formatter_class=YesNoDefaultsHelpFormatter)
    best.add_argument("--data", required=True,
                      help="scored lists {prompt, responses, scores, finish_reasons?} (posttrain judge --keep-all)")
    best.add_argument("--output", required=True, help="JSONL of {prompt, completion} records for `posttrain sft`")
    best.add_argument("--threshold", type=float, default=None,
                      help="keep every distinct reply scoring ≥ this instead of the best one per prompt")
    best.add_argument("--min-gap", type=float, default=0.0,
                      help="leave out prompts whose highest and lowest scores differ by less")
    best.add_argument("--keep-cut-off", action=YesNoFlag, default=False,
                      help="also select replies cut off at max_new_tokens (finish_reason 'length')")

    run = sub.add_parser("run", help="A recipe: stages from data to report, each cached by the hash of its inputs.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("recipe", help="recipe YAML (see recipes/quickstart.yaml)")
    run.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                     help="run this stage and every stage downstream of it again, even if cached")
    run.add_argument("--dry-run", action="store_true", help="print the plan (cached / resume / run) and stop")

    import_module("posttrain.datagen.cli").add_data_parser(sub)
    import_module("posttrain.annotate.commands").add_annotate_parser(sub)
    import_module("posttrain.eval.cli").add_eval_parser(sub)
    import_module("posttrain.eval.cli").add_report_parser(sub)
    chat = sub.add_parser("chat-template", help="Copy a base model with a chat template installed (its tokens, "
                          "embedding rows, EOS) for trainers that start from a chat model.")
    chat.add_argument("--model", required=True, help="base model: built-in name, HF id or folder")
    chat.add_argument("--template", required=True, metavar="SPEC", help="chatml | FILE.jinja | from:MODEL")
    chat.add_argument("--output", required=True, help="new folder for the model (must not hold files)")
    return parser


def run_generate(args) -> None:
    from posttrain.data.errors import is_blank
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.sampling import chat_replies

    params = sampling_params(args)
    params.validate()
    # The system message is checked as a prompt is (a blank one would be sent as a turn).
    messages = [(f"--prompt {i}", prompt) for i, prompt in enumerate(args.prompt, start=1)]
    for flag, text in messages + ([("--system", args.system)] if args.system is not None else []):
        if is_blank(text):
            raise ValueError(f"{flag}: expected a non-empty message, got {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{flag}: character {err.start} is not valid Unicode text "
                             f"({text[err.start]!r}, an undecodable byte?)") from None
    replies = chat_replies(load_causal_lm(args.model), load_tokenizer(args.model), args.prompt, params,
                           system=args.system, precision=args.precision)
    for prompt, reply in zip(args.prompt, replies):
        print(f"### {prompt}\n{reply}\n")


EXPECTED_ERRORS = (ValueError, OSError, RecursionError)
"""What bad input, a missing file or a full disk raise (UnicodeError and DataError are
ValueErrors, FileNotFoundError and PermissionError OSErrors): reported as one line, exit 2."""


def close_progress_bars() -> None:
    """Close the progress bars a failed run left open, so its error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # every bar not yet closed (tqdm keeps them for positioning)
        bar.close()


def error_line(err: BaseException) -> str:
    """`err` as one line: an OSError names its file and the system's reason, a RecursionError
    the nesting that caused it; any message is folded onto one line and cut at 600 characters."""
    if isinstance(err, RecursionError):
        return "input nested too deeply to process (a record or config nested hundreds of levels deep?)"
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
        if err.filename2 is not None:
            text += f" (→ {err.filename2})"
    else:
        # Line breaks fold into one space; spaces inside a line stay (a quoted "   " is a value).
        text = re.sub(r"\s*[\r\n]+\s*", " ", str(err)).strip() or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


NEGATIVE_NUMBER = re.compile(r"-(\.?[0-9]|inf|nan)", re.IGNORECASE)


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-5` as `--lr=-1e-5`: argparse takes "-1e-5" (unlike "-1" or "-0.5") for an
    option and reports that --lr "expected one argument"."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_NUMBER.match(arg):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """The `posttrain` command; returns its exit status. One process of a multi-process run
    (WORLD_SIZE > 1: torchrun, accelerate launch) started as the program (argv None) leaves by
    os._exit once the command is done (a signal's stop included), so the DDP modules a finished
    run keeps (trainers.sharding.KEPT_UNTIL_EXIT) are never torn down: freeing them could deadlock
    in gloo's process group after the run had saved and closed everything."""
    try:
        status = _main(argv)
    except SystemExit as stop:  # a run stopped by a signal (checkpoint_and_exit)
        if argv is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        status = stop.code if isinstance(stop.code, int) else 1
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


PATH_ARGUMENTS = ("data", "eval_data", "output", "output_dir", "db", "model", "baseline", "reward_model", "recipe",
                  "rubric", "config", "sources", "runs", "source", "templates", "guidelines", "seed_tasks",
                  "blocklist", "evals")
"""Destinations of every command's file, folder and model arguments: a blank one (only spaces or
invisible characters), or one holding an invisible or control character (data.errors.invisible_character),
is refused as it is parsed, before anything is read or written: `--output " "` would write a file
named by a space."""


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args(argv), but arguments no command takes, and blank PATH_ARGUMENTS, are
    reported by the (sub)command they were given to, with its usage: "posttrain sft: error:
    unrecognized arguments: …", where argparse names only the top-level program."""
    from posttrain.data.errors import invisible_character, is_blank

    args, extras = parser.parse_known_args(argv)
    command = parser
    while True:  # down the chain of subcommands the namespace chose (annotate add, data …)
        choice = next((action.choices.get(getattr(args, action.dest, None)) for action in command._actions
                       if isinstance(action, argparse._SubParsersAction)), None)
        if choice is None:
            break
        command = choice
    if extras:
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    # Subcommands are optional to argparse, so that `posttrain annotate --bogus` names --bogus
    # above rather than the missing subcommand; a group command given none stops here.
    missing = next((action for action in command._actions if isinstance(action, argparse._SubParsersAction)), None)
    if missing is not None:
        command.error(f"the following arguments are required: {missing.metavar} (one of {', '.join(missing.choices)})")
    for action in command._actions:
        given = getattr(args, action.dest, None) if action.dest in PATH_ARGUMENTS else None
        for value in given if isinstance(given, list) else [given]:
            if not isinstance(value, str):
                continue
            if is_blank(value) and (value or action.dest != "eval_data"):  # "": none
                problem = "is blank; it must name a file, folder or model"
            elif hidden := invisible_character(value):
                problem = f"holds a hidden character, {hidden}; type the name again"
            else:
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            # One line, without argparse's usage block: the flag was right, its value not.
            command.exit(2, f"{command.prog}: error: argument {name}: {value!r} {problem}\n")
    return args


def check_environment() -> None:
    """Refuse, in one line, a setting of the environment that would fail every command deep inside a
    library: torch creates TORCHINDUCTOR_CACHE_DIR as a folder when transformers is imported, and a
    file there made that a FileExistsError naming only the path."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if cache and os.path.lexists(cache) and not os.path.isdir(cache):
        what = "a broken link" if os.path.islink(cache) else "a file"
        raise ValueError(f"TORCHINDUCTOR_CACHE_DIR={cache!r} is {what}, not a folder: torch keeps compiled kernels "
                         "in a folder there; name a folder or unset it")


def _main(argv: list[str] | None) -> int:
    # transformers' "Loading weights" and datasets' map bars say nothing a user needs next to our
    # own progress bars; set either variable to 0 to see them. Read when those libraries import.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may stand anywhere before a "--", so it works after any subcommand too.
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("POSTTRAIN_DEBUG", "") not in ("", "0")
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    args = parse_command_line(build_parser(), _join_negative_numbers(argv))
    command = " ".join(x for x in (args.command, getattr(args, "data_command", None),
                                   getattr(args, "annotate_command", None)) if x)
    try:
        check_environment()
        if args.command == "generate":
            run_generate(args)
        elif args.command == "sample":
            stopped_by = import_module("posttrain.sampling.files").sample_file(
                args.model, args.data, args.output, sampling_params(args, args.n), batch_size=args.batch_size,
                precision=args.precision, max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid)
            return 0 if stopped_by is None else 128 + stopped_by
        elif args.command == "score":
            import_module("posttrain.scoring.files").score_file(args.data, args.output, judge=args.judge,
                                                                model=args.model, batch_size=args.batch_size,
                                                                precision=args.precision)
        elif args.command == "judge":
            import_module("posttrain.scoring.files").judge_file(
                args.data, args.judge, args.output, rubric=args.rubric, pairing=args.pairing,
                min_score_gap=args.min_score_gap, tie_margin=args.tie_margin, keep_all=args.keep_all,
                batch_size=args.batch_size, precision=args.precision)
        elif args.command == "best-of-n":
            import_module("posttrain.datagen.best_of_n").best_of_n_file(
                args.data, args.output, threshold=args.threshold, min_gap=args.min_gap,
                keep_cut_off=args.keep_cut_off)
        elif args.command == "run":
            import_module("posttrain.recipes").run_recipe(args.recipe, from_stage=args.from_stage,
                                                          dry_run=args.dry_run)
        elif args.command == "data":
            return import_module("posttrain.datagen.cli").run_data(args)
        elif args.command == "eval":
            import_module("posttrain.eval.cli").run_eval(args)
        elif args.command == "report":
            import_module("posttrain.eval.cli").run_report(args)
        elif args.command == "annotate":
            return import_module("posttrain.annotate.commands").run(args)
        elif args.command == "chat-template":
            import_module("posttrain.models.chat_template").save_with_chat_template(args.model, args.template,
                                                                                   args.output)
        else:
            given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug")}
            cfg = build_config(CONFIGS[args.command], args.config, given)
            import_module(TRAINERS[args.command]).train(cfg)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        close_progress_bars()
        print(f"posttrain {command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no signal handler of ours caught it (a scoring pass, say)
        if debug:
            raise
        close_progress_bars()
        print(f"posttrain {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a bad input: one line here, the traceback under --debug
        if debug:
            raise
        close_progress_bars()
        if "No space left on device" in str(err):  # safetensors' SafetensorError wraps the OS's ENOSPC
            print(f"posttrain {command}: error: no space left on device ({error_line(err)})", file=sys.stderr)
            return 2
        print(f"posttrain {command}: internal error: {type(err).__name__}: {error_line(err)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
