"""`posttrain data …`: the commands that build training data, registered from one table.

Each entry of DATA_COMMANDS names a subcommand and where it lives:

    "name": ("module.path", "add_parser", "run")

* `add_parser(data_sub, name)` adds `data_sub.add_parser(name, …)` with its flags (`data_sub`
  is the `data` command's subparsers action);
* `run(args)` runs it and returns the exit code (None means 0); a bad input raises ValueError
  or FileNotFoundError with a one-line message, which `posttrain.cli.main` prints.

Every module is imported when the parser is built (so `posttrain data --help` lists them all),
so keep a command module's top-level imports light: torch, transformers and jinja2 belong
inside the functions that need them.
"""

from __future__ import annotations

import argparse
from importlib import import_module

DATA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "template": ("posttrain.datagen.templates", "add_parser", "run"),
    "mix": ("posttrain.datagen.mix", "add_parser", "run"),
    "generate": ("posttrain.datagen.self_instruct", "add_parser", "run"),
    # A further `posttrain data` command is one more line: "name": ("module", "add_parser", "run").
}
"""Subcommand of `posttrain data` → (module, its add-parser function, its run function)."""


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """The `data` command and one subcommand per DATA_COMMANDS entry."""
    data = sub.add_parser("data", help="Build instruction data: " + ", ".join(DATA_COMMANDS) + ".")
    # Not required here: parse_command_line asks for it after naming any unrecognized argument.
    data_sub = data.add_subparsers(dest="data_command", required=False, metavar="DATA_COMMAND")
    for name, (module, add_parser, _) in DATA_COMMANDS.items():
        getattr(import_module(module), add_parser)(data_sub, name)


def run_data(args: argparse.Namespace) -> int:
    """Run the `posttrain data` subcommand that `args.data_command` names."""
    module, _, run = DATA_COMMANDS[args.data_command]
    return getattr(import_module(module), run)(args) or 0
