"""Validate records of each supported shape and turn them into chat messages.

A message is `{"role": "system" | "user" | "assistant", "content": non-empty str}`; a
conversation is a list of them, with a system message (if any) only first and the first
other message from the user.

SFT records (`sft_messages`), exactly one of:

* `{"prompt", "completion"}` — strings (a user turn and the assistant's answer), or a prompt
  conversation ending in a user turn and a completion list of assistant messages.
* Alpaca `{"instruction", "input"?, "output"}` — a non-empty `input` is appended to the
  instruction after a blank line ("{instruction}\\n\\n{input}") to form the one user turn.
* `{"messages": [...]}` — a conversation ending in an assistant turn.

Preference records (`preference_pairs`), exactly one of:

* `{"prompt", "chosen", "rejected", "margin"?}` — prompt a string or a conversation ending
  in a user turn; chosen/rejected a string or a list of assistant messages.
* `{"chosen", "rejected", "prompt"?}` where chosen and rejected are full conversations that
  share every message up to the final assistant reply(ies); the shared part is the prompt
  (and must equal `prompt` when one is given too, as ultrafeedback_binarized writes it).
* `{"prompt", "responses": [...], "scores": [...]}` — expanded into pairs (see
  `preference_pairs`).

Labelled completions (`labelled_completions`, KTO's unpaired feedback), exactly one of:

* `{"prompt", "completion", "label"}` — prompt and completion as in SFT records; label a JSON
  boolean, true for a desirable answer (thumbs up), false for an undesirable one.
* any preference record: each pair it holds gives a desirable example (its chosen reply) and
  an undesirable one (its rejected reply).

Prompt records (`prompt_messages`): `{"prompt": str | conversation}` or `{"messages": [...]}`,
ending in a user turn.

Sample records (`sampled_responses`, what `posttrain sample` writes and `posttrain judge`
reads): a prompt record plus `"responses": [str, ...]` (empty strings included: a model may
emit EOS at once) and optional `"finish_reasons"`.
Scored records (`scored_responses`, what `posttrain judge` writes with an rm: or fn: judge and
`posttrain best-of-n` reads): `{"prompt", "responses", "scores", "finish_reasons"?}`, one or
more responses.
Records to score (`scoring_conversation`, `posttrain score`): `{"prompt", "response"}` or
`{"messages": [...]}` ending in an assistant turn.

Fields that belong to no shape (ids, metadata) are ignored; a null field counts as absent.
`index` is the record's 0-based position in its source; messages print it 1-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data.errors import RecordError, is_blank, short_repr, type_name

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content"}
PAIRINGS = ("all", "best_vs_rest")

SFT_SHAPES = {
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
}
PREFERENCE_SHAPES = {
    "pair": ("chosen", "rejected", "margin"),
    "scored": ("responses", "scores"),
}
PROMPT_SHAPES = {"prompt": ("prompt",), "chat": ("messages",)}
SFT_HELP = "{prompt, completion} | {instruction, input?, output} | {messages}"
PREFERENCE_HELP = ("{prompt, chosen, rejected, margin?} | {chosen, rejected} as conversations"
                   " | {prompt, responses, scores}")
PROMPT_HELP = "{prompt} | {messages}"
LABELLED_SHAPES = {"unpaired": ("completion", "label"), **PREFERENCE_SHAPES}
LABELLED_HELP = "{prompt, completion, label} | " + PREFERENCE_HELP


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: `chosen` is preferred to `rejected` as the continuation of `prompt`.

    prompt: conversation ending in a user turn. chosen / rejected: one or more assistant
    messages that continue it. margin: the record's optional "margin" (how much better chosen
    is, for margin-aware reward losses), else None. source_index: 0-based record position.
    """

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    margin: float | None
    source_index: int


@dataclass(frozen=True)
class LabelledCompletion:
    """One completion with a thumbs up or down. prompt: conversation ending in a user turn.
    completion: one or more assistant messages that continue it. label: True for desirable,
    False for undesirable. source_index: 0-based record position."""

    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    label: bool
    source_index: int


class _Record:
    """A record plus where it came from, so every check can raise a precise RecordError."""

    def __init__(self, record: Any, source: str, index: int):
        self.source, self.number = str(source), index + 1
        if not isinstance(record, dict):
            raise RecordError(self.source, self.number, "*", f"expected an object, got {type_name(record)} "
                              f"{short_repr(record)}", reason="record not an object")
        self.data = record

    def fail(self, field: str, problem: str, *, reason: str) -> RecordError:
        return RecordError(self.source, self.number, field, problem, reason=reason)

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def get(self, field: str) -> Any:
        if not self.has(field):
            present = sorted(k for k in self.data if self.data[k] is not None)
            raise self.fail(field, f"missing (record has fields {present})", reason=f"missing field '{field}'")
        return self.data[field]

    def shape(self, shapes: dict[str, tuple[str, ...]], expected: str) -> str:
        """The one shape whose fields the record uses; error (listing `expected`) if none or several."""
        used = {name: [f for f in fields if self.has(f)] for name, fields in shapes.items()}
        used = {name: fields for name, fields in used.items() if fields}
        if len(used) == 1:
            return next(iter(used))
        if not used:
            present = sorted(k for k in self.data if self.data[k] is not None)
            raise self.fail(shapes[next(iter(shapes))][0], f"expected the fields of one record shape ({expected}), "
                            f"got fields {present}", reason="unknown record shape")
        (first, first_fields), (second, second_fields) = list(used.items())[:2]
        raise self.fail(second_fields[0], f"expected the fields of one record shape, got {first} field "
                        f"'{first_fields[0]}' together with {second} field '{second_fields[0]}'",
                        reason="ambiguous record shape")


def _unicode(rec: _Record, value: str, field: str) -> str:
    """`value` if it is valid Unicode text; a lone surrogate (JSON "\\ud800", or an invalid byte
    a shell argument decoded with surrogateescape) cannot be tokenised or written as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise rec.fail(field, f"contains {value[err.start]!r} at character {err.start}, a lone surrogate "
                       "(not valid Unicode text)", reason="invalid unicode") from None
    return value


def _text(rec: _Record, value: Any, field: str) -> str:
    name = field.rsplit(".", 1)[-1].split("[")[0]
    if not isinstance(value, str):
        raise rec.fail(field, f"expected a string, got {type_name(value)} {short_repr(value)}",
                       reason=f"non-string {name}")
    if is_blank(value):
        raise rec.fail(field, f"expected a non-empty string, got {short_repr(value)}", reason=f"empty {name}")
    return _unicode(rec, value, field)


def _conversation(rec: _Record, value: Any, field: str) -> list[dict[str, str]]:
    """Validate a message list; returns fresh {"role", "content"} dicts."""
    name = field.split("[")[0]
    if not isinstance(value, list):
        raise rec.fail(field, f"expected a list of messages, got {type_name(value)} {short_repr(value)}",
                       reason=f"non-list {name}")
    if not value:
        raise rec.fail(field, "expected at least one message, got []", reason=f"empty {name}")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise rec.fail(where, f"expected a message object, got {type_name(message)} {short_repr(message)}",
                           reason="message not an object")
        if set(message) - MESSAGE_KEYS:
            raise rec.fail(where, f"expected only the keys 'role' and 'content', got {sorted(message)}",
                           reason="unexpected message key")
        if "role" not in message:
            raise rec.fail(f"{where}.role", f"missing (message has keys {sorted(message)})", reason="missing role")
        role = message["role"]
        if role not in ROLES:
            raise rec.fail(f"{where}.role", f"expected one of {list(ROLES)}, got {short_repr(role)}",
                           reason="unknown role")
        if role == "system" and i > 0:
            raise rec.fail(f"{where}.role", "expected a system message only as the first message, got 'system'",
                           reason="system message not first")
        if "content" not in message:
            raise rec.fail(f"{where}.content", "missing", reason="missing content")
        messages.append({"role": role, "content": _text(rec, message["content"], f"{where}.content")})
    return messages


def _check_opening(rec: _Record, messages: list[dict[str, str]], field: str) -> None:
    """The first non-system message must be the user's: templates render nothing sensible otherwise."""
    start = 1 if messages[0]["role"] == "system" else 0
    if start >= len(messages):
        raise rec.fail(field, "expected a user turn after the system message, got only a system message",
                       reason="no user turn")
    if messages[start]["role"] != "user":
        raise rec.fail(f"{field}[{start}].role", f"expected the first turn to be 'user', got "
                       f"{short_repr(messages[start]['role'])}", reason="conversation does not start with user")


def _check_text_or_list(rec: _Record, value: Any, field: str) -> None:
    if not isinstance(value, (str, list)):
        raise rec.fail(field, f"expected a string or a list of messages, got {type_name(value)} {short_repr(value)}",
                       reason=f"non-string {field.split('[')[0]}")


def _prompt(rec: _Record, value: Any, field: str) -> list[dict[str, str]]:
    """A prompt string or conversation → messages ending in a user turn."""
    _check_text_or_list(rec, value, field)
    if isinstance(value, str):
        return [{"role": "user", "content": _text(rec, value, field)}]
    messages = _conversation(rec, value, field)
    _check_opening(rec, messages, field)
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise rec.fail(f"{field}[{last}].role", f"expected the prompt to end with a user turn, got "
                       f"{short_repr(messages[last]['role'])}", reason="prompt does not end with a user turn")
    return messages


def _reply(rec: _Record, value: Any, field: str) -> list[dict[str, str]]:
    """A reply string or list of assistant messages → assistant messages."""
    _check_text_or_list(rec, value, field)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(rec, value, field)}]
    messages = _conversation(rec, value, field)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise rec.fail(f"{field}[{i}].role", f"expected only assistant messages, got {short_repr(message['role'])}",
                           reason=f"non-assistant message in {field.split('[')[0]}")
    return messages


def sft_messages(record: Any, *, source: str, index: int) -> list[dict[str, str]]:
    """The conversation an SFT record describes, ending in an assistant turn; RecordError if invalid."""
    rec = _Record(record, source, index)
    shape = rec.shape(SFT_SHAPES, SFT_HELP)
    if shape == "prompt/completion":
        return _prompt(rec, rec.get("prompt"), "prompt") + _reply(rec, rec.get("completion"), "completion")
    if shape == "alpaca":
        instruction = _text(rec, rec.get("instruction"), "instruction")
        extra = rec.data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise rec.fail("input", f"expected a string, got {type_name(extra)} {short_repr(extra)}",
                           reason="non-string input")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        output = _text(rec, rec.get("output"), "output")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages = _conversation(rec, rec.get("messages"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise rec.fail("messages", f"expected at least one assistant turn, got roles {roles}",
                       reason="no assistant turn")
    _check_opening(rec, messages, "messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise rec.fail(f"messages[{last}].role", f"expected the conversation to end with an assistant turn, got "
                       f"{short_repr(messages[last]['role'])}", reason="conversation does not end with assistant")
    return messages


def prompt_messages(record: Any, *, source: str, index: int) -> list[dict[str, str]]:
    """The prompt conversation of a prompt record (for generation), ending in a user turn."""
    rec = _Record(record, source, index)
    field = "prompt" if rec.shape(PROMPT_SHAPES, PROMPT_HELP) == "prompt" else "messages"
    return _prompt(rec, rec.get(field), field)


def preference_pairs(
    record: Any, *, source: str, index: int, pairing: str = "all", min_score_gap: float = 0.0
) -> list[PreferencePair]:
    """The comparisons a preference record holds: one for a chosen/rejected record, any number
    (possibly none, when no score gap exceeds `min_score_gap`) for a scored record.

    Scored records: pairing="all" pairs every two responses, "best_vs_rest" the first
    highest-scored response with each other one; a pair forms only when the score gap is
    > min_score_gap, so equal scores never form one. Scored pairs get margin None.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {list(PAIRINGS)}, got {pairing!r}")
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap: expected >= 0, got {min_score_gap!r}")
    rec = _Record(record, source, index)
    if rec.shape(PREFERENCE_SHAPES, PREFERENCE_HELP) == "scored":
        return _scored_pairs(rec, index, pairing, min_score_gap)
    chosen_value, rejected_value = rec.get("chosen"), rec.get("rejected")
    if _is_full_conversation(chosen_value) or _is_full_conversation(rejected_value):
        prompt, chosen, rejected = _split_conversations(rec, chosen_value, rejected_value)
    else:
        prompt = _prompt(rec, rec.get("prompt"), "prompt")
        chosen, rejected = _reply(rec, chosen_value, "chosen"), _reply(rec, rejected_value, "rejected")
    if chosen == rejected:
        raise rec.fail("rejected", f"expected a response different from 'chosen', got the same "
                       f"{short_repr(chosen[-1]['content'])}", reason="chosen identical to rejected")
    return [PreferencePair(prompt, chosen, rejected, _margin(rec), index)]


def _is_full_conversation(value: Any) -> bool:
    """A message list that starts with a non-assistant turn, i.e. includes its own prompt."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and value[0].get("role") != "assistant")


def _split_conversations(rec: _Record, chosen_value: Any, rejected_value: Any):
    """Full chosen/rejected conversations → (shared prompt, chosen tail, rejected tail)."""
    for field, value, other in (("chosen", chosen_value, "rejected"), ("rejected", rejected_value, "chosen")):
        if not isinstance(value, list):
            raise rec.fail(field, f"expected a full conversation, as '{other}' is one, got {type_name(value)} "
                           f"{short_repr(value)}", reason="chosen and rejected of different shapes")
    chosen_all = _conversation(rec, chosen_value, "chosen")
    rejected_all = _conversation(rec, rejected_value, "rejected")
    if chosen_all == rejected_all:
        raise rec.fail("rejected", f"expected a conversation different from 'chosen', got the same "
                       f"{short_repr(rejected_all[-1]['content'])}", reason="chosen identical to rejected")
    shared = 0
    while (shared < min(len(chosen_all), len(rejected_all))
           and chosen_all[shared] == rejected_all[shared]):
        shared += 1
    if shared == 0:
        raise rec.fail("rejected", "expected chosen and rejected to share the prompt turns, got different first "
                       f"messages {short_repr(rejected_all[0])}", reason="no shared prompt")
    for field, messages in (("chosen", chosen_all), ("rejected", rejected_all)):
        if shared == len(messages):
            raise rec.fail(field, "expected a reply after the prompt it shares with the other conversation, "
                           f"got none ({len(messages)} messages, all shared)", reason=f"empty {field}")
        if any(m["role"] != "assistant" for m in messages[shared:]):
            raise rec.fail(f"{field}[{shared}]", "expected chosen and rejected to differ only in the final "
                           f"assistant turn(s), got a difference at {short_repr(messages[shared])}",
                           reason="conversations differ before the reply")
    prompt = _prompt(rec, chosen_all[:shared], "chosen")
    if rec.has("prompt") and _prompt(rec, rec.get("prompt"), "prompt") != prompt:
        raise rec.fail("prompt", "expected the turns chosen and rejected begin with, got "
                       f"{short_repr(rec.get('prompt'))}", reason="prompt does not match conversations")
    return prompt, chosen_all[shared:], rejected_all[shared:]


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32. Margins, scores and rewards become float32 tensors in training, so a
number finite in JSON (1e308) or Python but beyond this would turn into ±inf there."""


def in_float32_range(value: Any) -> bool:
    """True for an int or float (not a bool) with |value| ≤ FLOAT32_MAX; False for NaN and ±inf."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and abs(value) <= FLOAT32_MAX


def _number(rec: _Record, value: Any, field: str, reason: str) -> float:
    if not in_float32_range(value):
        numeric = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value  # not NaN
        beyond = " (beyond float32's ±3.4e38, what training computes in)" if numeric else ""
        raise rec.fail(field, f"expected a finite number, got {type_name(value)} {short_repr(value)}{beyond}",
                       reason=reason)
    return float(value)


def _margin(rec: _Record) -> float | None:
    return _number(rec, rec.data["margin"], "margin", "non-numeric margin") if rec.has("margin") else None


def _scored_pairs(rec: _Record, index: int, pairing: str, min_score_gap: float) -> list[PreferencePair]:
    prompt = _prompt(rec, rec.get("prompt"), "prompt")
    responses_value, scores_value = rec.get("responses"), rec.get("scores")
    for field, value in (("responses", responses_value), ("scores", scores_value)):
        if not isinstance(value, list):
            raise rec.fail(field, f"expected a list, got {type_name(value)} {short_repr(value)}",
                           reason=f"non-list {field}")
    responses = [_reply(rec, r, f"responses[{i}]") for i, r in enumerate(responses_value)]
    scores = [_number(rec, s, f"scores[{i}]", "non-numeric score") for i, s in enumerate(scores_value)]
    if len(responses) != len(scores):
        raise rec.fail("scores", f"expected {len(responses)} scores, one per response, got {len(scores)} "
                       f"{short_repr(scores_value)}", reason="responses/scores length mismatch")
    if len(responses) < 2:
        raise rec.fail("responses", f"expected at least 2 responses, got {len(responses)}",
                       reason="fewer than 2 responses")
    if len(set(scores)) == 1:
        raise rec.fail("scores", f"expected at least two different scores, got {short_repr(scores_value)} "
                       "(ties only)", reason="ties only")
    if pairing == "all":
        candidates = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))]
    else:
        best = scores.index(max(scores))
        candidates = [(best, j) for j in range(len(scores)) if j != best]
    pairs = []
    for i, j in candidates:
        if abs(scores[i] - scores[j]) <= min_score_gap:
            continue
        hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
        if responses[hi] == responses[lo]:
            raise rec.fail(f"responses[{max(i, j)}]", f"expected a response different from responses[{min(i, j)}] "
                           f"(scores differ), got the same {short_repr(responses[hi][-1]['content'])}",
                           reason="chosen identical to rejected")
        pairs.append(PreferencePair(prompt, responses[hi], responses[lo], None, index))
    return pairs


def labelled_completions(
    record: Any, *, source: str, index: int, pairing: str = "all", min_score_gap: float = 0.0
) -> list[LabelledCompletion]:
    """The labelled examples a record holds: one for a `{prompt, completion, label}` record; for
    a preference record, two per pair (`preference_pairs` with `pairing` and `min_score_gap`):
    the chosen reply labelled True and the rejected reply labelled False."""
    rec = _Record(record, source, index)
    if rec.shape(LABELLED_SHAPES, LABELLED_HELP) != "unpaired":
        pairs = preference_pairs(record, source=source, index=index, pairing=pairing, min_score_gap=min_score_gap)
        return [LabelledCompletion(pair.prompt, reply, label, index)
                for pair in pairs for reply, label in ((pair.chosen, True), (pair.rejected, False))]
    prompt = _prompt(rec, rec.get("prompt"), "prompt")
    completion = _reply(rec, rec.get("completion"), "completion")
    label = rec.get("label")
    if not isinstance(label, bool):
        raise rec.fail("label", f"expected true or false, got {type_name(label)} {short_repr(label)}",
                       reason="non-boolean label")
    return [LabelledCompletion(prompt, completion, label, index)]


FINISH_REASONS = ("eos", "stop", "length")
"""Why a sampled response ended: its EOS token, a stop string, or max_new_tokens. Defined here,
below sampling/, which imports it."""


@dataclass(frozen=True)
class SampledResponses:
    """The responses sampled for one prompt. prompt: conversation ending in a user turn.
    responses: N reply texts, possibly empty or whitespace-only (a model may emit EOS at once).
    finish_reasons: N values of FINISH_REASONS, all "eos" when the record gives none (every
    reply finished)."""

    prompt: list[dict[str, str]]
    responses: list[str]
    finish_reasons: list[str]


def sampled_responses(record: Any, *, source: str, index: int, min_responses: int = 1) -> SampledResponses:
    """A sample record `{"prompt" | "messages", "responses", "finish_reasons"?}`; RecordError if
    invalid. A record holding both "prompt" and "messages" (a chat prompt record that the
    sampler gave a "prompt") must hold the same conversation in both."""
    rec = _Record(record, source, index)
    if rec.has("prompt") and rec.has("messages"):
        prompt = _prompt(rec, rec.get("prompt"), "prompt")
        if _prompt(rec, rec.get("messages"), "messages") != prompt:
            raise rec.fail("messages", "expected the conversation 'prompt' holds, got "
                           f"{short_repr(rec.get('messages'))}", reason="prompt and messages differ")
    else:
        field = "prompt" if rec.shape(PROMPT_SHAPES, PROMPT_HELP) == "prompt" else "messages"
        prompt = _prompt(rec, rec.get(field), field)
    value = rec.get("responses")
    if not isinstance(value, list):
        raise rec.fail("responses", f"expected a list of strings, got {type_name(value)} {short_repr(value)}",
                       reason="non-list responses")
    for i, response in enumerate(value):
        if not isinstance(response, str):
            raise rec.fail(f"responses[{i}]", f"expected a string, got {type_name(response)} {short_repr(response)}",
                           reason="non-string responses")
        _unicode(rec, response, f"responses[{i}]")
    responses = list(value)
    if len(responses) < min_responses:
        raise rec.fail("responses", f"expected at least {min_responses} responses, got {len(responses)}",
                       reason=f"fewer than {min_responses} responses")
    return SampledResponses(prompt, responses, _finish_reasons(rec, len(responses)))


def _finish_reasons(rec: _Record, count: int) -> list[str]:
    """The record's "finish_reasons", one of FINISH_REASONS per response; all "eos" when absent."""
    if not rec.has("finish_reasons"):
        return ["eos"] * count
    reasons = rec.get("finish_reasons")
    if not isinstance(reasons, list) or len(reasons) != count:
        raise rec.fail("finish_reasons", f"expected a list of {count} values, one per response, got "
                       f"{type_name(reasons)} {short_repr(reasons)}", reason="bad finish_reasons")
    for i, reason in enumerate(reasons):
        if reason not in FINISH_REASONS:
            raise rec.fail(f"finish_reasons[{i}]", f"expected one of {list(FINISH_REASONS)}, got {short_repr(reason)}",
                           reason="unknown finish reason")
    return list(reasons)


@dataclass(frozen=True)
class ScoredResponses:
    """The scored responses to one prompt, as `posttrain judge` writes them with an rm: or fn:
    judge. prompt: conversation ending in a user turn. responses: N non-empty replies as the
    record gives them (strings, or lists of assistant messages). scores: N finite floats.
    finish_reasons: N values of FINISH_REASONS, all "eos" when the record gives none."""

    prompt: list[dict[str, str]]
    responses: list[str | list[dict[str, str]]]
    scores: list[float]
    finish_reasons: list[str]


def scored_responses(record: Any, *, source: str, index: int) -> ScoredResponses:
    """A scored record `{"prompt", "responses", "scores", "finish_reasons"?}` with at least one
    response (unlike a preference record, one response or equal scores are valid); RecordError
    if invalid."""
    rec = _Record(record, source, index)
    prompt = _prompt(rec, rec.get("prompt"), "prompt")
    responses_value, scores_value = rec.get("responses"), rec.get("scores")
    for field, value in (("responses", responses_value), ("scores", scores_value)):
        if not isinstance(value, list):
            raise rec.fail(field, f"expected a list, got {type_name(value)} {short_repr(value)}",
                           reason=f"non-list {field}")
    if not responses_value:
        raise rec.fail("responses", "expected at least 1 response, got 0", reason="no responses")
    for i, response in enumerate(responses_value):
        _reply(rec, response, f"responses[{i}]")
    scores = [_number(rec, s, f"scores[{i}]", "non-numeric score") for i, s in enumerate(scores_value)]
    if len(scores) != len(responses_value):
        raise rec.fail("scores", f"expected {len(responses_value)} scores, one per response, got {len(scores)} "
                       f"{short_repr(scores_value)}", reason="responses/scores length mismatch")
    return ScoredResponses(prompt, list(responses_value), scores, _finish_reasons(rec, len(scores)))


def scoring_conversation(record: Any, *, source: str, index: int) -> tuple[list[dict], list[dict]]:
    """(prompt messages, response messages) of a record to score; RecordError if invalid.

    Shapes: {"prompt": str | conversation, "response": str}, or {"messages": [...]} ending in
    an assistant turn (the trailing assistant turns are the response).
    """
    rec = _Record(record, source, index)
    present = sorted(k for k in rec.data if rec.has(k))
    if "messages" in present and not {"prompt", "response"} & set(present):
        messages = sft_messages({"messages": record["messages"]}, source=source, index=index)
        split = len(messages)
        while messages[split - 1]["role"] == "assistant":
            split -= 1
        return messages[:split], messages[split:]
    for field in ("prompt", "response"):
        if field not in present:
            raise rec.fail(field, f"missing (expected {{prompt, response}} or {{messages}}, record has fields "
                           f"{present})", reason=f"missing field '{field}'")
    prompt = prompt_messages({"prompt": record["prompt"]}, source=source, index=index)
    response = record["response"]
    if not isinstance(response, str) or is_blank(response):
        raise rec.fail("response", f"expected a non-empty string, got {type_name(response)} {short_repr(response)}",
                       reason="bad response")
    return prompt, [{"role": "assistant", "content": _unicode(rec, response, "response")}]
