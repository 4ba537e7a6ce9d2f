"""A programmatic reward, `fn:module:function`: f(prompts, responses) -> one float per response.

prompts are the last user turns and responses the reply texts; a function with a parameter
named `records` also gets the source record of each row (a reference answer, a test case).
Every call is checked: the count, and each score a finite number. The module is imported with
the current folder first on sys.path, as `python -m posttrain.cli` has it, so
`fn:examples.rewards:exact_match` works from the repository root under the `posttrain` script too.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Callable, Iterator

from posttrain.data.errors import short_repr
from posttrain.data.formats import FLOAT32_MAX

RewardFn = Callable[..., list[float]]


class ScoreError(ValueError):
    """The score of one row of a scoring call is unusable; `row` is its 0-based position."""

    def __init__(self, message: str, *, row: int):
        super().__init__(message)
        self.row = row


@contextmanager
def current_folder_first() -> Iterator[None]:
    """The current folder first on sys.path while the block runs. `python -m` puts it there, a
    console script such as `posttrain` does not (its sys.path starts at its bin/ folder), so
    without this `fn:mytask:reward` would miss ./mytask.py."""
    folder = os.getcwd()
    if folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def load_reward_fn(target: str) -> RewardFn:
    """`module:function` -> the function; ValueError naming `fn:{target}` if it cannot be found.
    The module is looked up in the current folder first (see `current_folder_first`)."""
    module_name, _, name = (part.strip() for part in target.partition(":"))
    if not module_name or not name:
        raise ValueError(f"fn:{target}: expected fn:module:function")
    try:
        with current_folder_first():
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"fn:{target}: cannot import {module_name!r} ({err})") from None
    # The module's own code failed (SyntaxError, NameError, sys.exit, ...): one line naming it.
    except (Exception, SystemExit) as err:
        lines = str(err).strip().splitlines()
        raise ValueError(f"fn:{target}: importing {module_name!r} failed with {type(err).__name__}"
                         f"{': ' + lines[0] if lines else ''}") from None
    fn = vars(module).get(name)
    if fn is None:
        raise ValueError(f"fn:{target}: module {module_name} has no function {name!r}")
    if not callable(fn):
        raise ValueError(f"fn:{target}: {module_name}.{name} is not a function (type {type(fn).__name__})")
    return fn


def call_reward_fn(fn: RewardFn, spec: str, prompts: list[str], responses: list[str],
                   records: list | None = None) -> list[float]:
    """N scores of N (prompt, response) texts from `fn`, passing `records` (N source records)
    when it has a parameter of that name.

    Errors, one line each starting with `spec`: the function raised (its exception type and whole
    message, line breaks folded into spaces), returned something other than a list (None, a
    number, a string, a dict) or another count, or a non-number or non-finite value (ScoreError
    with the row).
    """
    kwargs = {}
    if "records" in inspect.signature(fn).parameters:
        if records is None:
            raise ValueError(f"{spec}: takes `records`, but this caller has no source records")
        kwargs["records"] = list(records)
    expected = f"expected a list of {len(responses)} numbers"
    try:
        result = fn(list(prompts), list(responses), **kwargs)
        # list() inside the try: a generator's own failure is the function raising.
        listed = isinstance(result, Iterable) and not isinstance(result, (str, bytes, Mapping))
        out = list(result) if listed else None
    # Any failure of user code becomes one line naming it; a sys.exit() in it too, which would
    # otherwise end the whole run silently with the function's exit code.
    except (Exception, SystemExit) as err:
        message = " ".join(line.strip() for line in str(err).strip().splitlines())
        what = f"{type(err).__name__}: {message}" if message else type(err).__name__
        raise ValueError(f"{spec}: raised {what}") from err
    if out is None:
        what = "None" if result is None else f"a {type(result).__name__} ({str(result)[:40]})"
        raise ValueError(f"{spec}: returned {what}, {expected}")
    if len(out) != len(responses):
        raise ValueError(f"{spec}: returned {len(out)} scores for {len(responses)} responses")
    for row, value in enumerate(out):
        # Beyond float32's range a finite Python score becomes ±inf in the training tensors.
        # numbers.Real takes NumPy scalars (np.float32, np.int64) as well as int and float.
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or abs(value) > FLOAT32_MAX
                or not math.isfinite(value)):
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
            beyond = " within float32's ±3.4e38" if numeric else ""
            # 10**400 has 401 digits; past 4300 digits repr() itself refuses (int_max_str_digits).
            shown = f"an int of {value.bit_length()} bits" if isinstance(value, int) and value.bit_length() > 14000 \
                else short_repr(value)
            raise ScoreError(f"{spec}: score {row} is {shown}, expected a finite number{beyond}", row=row)
    return [float(value) for value in out]


def last_user_turn(prompt: str | list[dict[str, str]]) -> str:
    """The text a reward function reads for a prompt: itself, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def reply_text(response: str | list[dict[str, str]]) -> str:
    """The text a reward function reads for a reply: itself, or its assistant messages joined by newlines."""
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


class FunctionScorer:
    """`fn:module:function` as a Scorer: score(prompts, responses, records=None, *, finished=None)
    -> N floats. `finished` is accepted for the interface and not passed on (today's contract)."""

    def __init__(self, fn: RewardFn, spec: str):
        self.fn = fn
        self.spec = spec

    def score(self, prompts: list, responses: list, records: list | None = None, *,
              finished: list[bool] | None = None) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.spec}: {len(prompts)} prompts but {len(responses)} responses")
        return call_reward_fn(self.fn, self.spec, [last_user_turn(p) for p in prompts],
                              [reply_text(r) for r in responses], records)


def load_function_scorer(target: str, spec: str, *, batch_size: int = 8, precision: str = "auto",
                         device: str = "cpu") -> FunctionScorer:
    """The scorer of `fn:{target}`. batch_size, precision and device are the other kinds'
    options (one signature for the registry); a function runs as it is written."""
    return FunctionScorer(load_reward_fn(target), spec)
