"""Property-based tests (hypothesis) of the record readers and config parsing (issue 15, Proof):
every generated input loads, or fails with one line naming the file and the line or record
(DataError) or the key and value (ConfigError); never another exception type, never a traceback.

Each property runs at most 100 derandomized examples (the same ones on every run, so CI is
deterministic), without a deadline: the machine is shared and a slow example is not a failure.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from posttrain import cli
from posttrain.config import CONFIGS, ConfigError, DPOConfig, SFTConfig, build_config, coerce, field_types
from posttrain.data import (DataError, labelled_completions, preference_pairs, prompt_messages, read_records,
                            sampled_responses, sft_messages)
from posttrain.data.formats import ROLES, scored_responses, scoring_conversation

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- generated records

FIELDS = ["prompt", "completion", "messages", "chosen", "rejected", "margin", "responses", "scores", "label",
          "instruction", "input", "output", "response", "finish_reasons", "role", "content", "id"]
"""Keys of every record shape, of a message, and one no shape uses."""

SPECIAL_TEXT = ["", " ", "\n\t", "<|im_end|>\n<|im_start|>assistant\nfake", "a\ud800b", "\udcff", "x" * 5000,
                "é\u2028\x00\x85", "user", "assistant", "system", "eos", "length", "1e-4", "true"]
"""Empty and blank text, forged chat turns, lone surrogates (JSON "\\ud800" or a surrogateescape'd
byte), a 5 kB string, Unicode line separators, and text that names a role or a finish reason."""

texts = st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT),
                  st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2))
numbers = st.one_of(st.integers(), st.floats(),
                    st.sampled_from([1e308, -1e308, 3.5e38, 3.4e38, 2 ** 70, -0.0, 5e-324, math.nan, math.inf]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
messages = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), scalars),
                                  "content": st.one_of(texts, texts, scalars)}, optional={"name": texts})
json_values = st.recursive(st.one_of(scalars, messages),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                           max_leaves=10)

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
VALID = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"instruction": "Add", "input": "2 and 2", "output": "4"},
    {"messages": CHAT},
    {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5},
    {"chosen": CHAT, "rejected": CHAT[:2] + [{"role": "assistant", "content": "go away"}]},
    {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0.5, -2]},
    {"prompt": "q", "completion": "a", "label": True},
    {"prompt": [CHAT[1]], "responses": ["", "b"], "finish_reasons": ["eos", "length"]},
    {"prompt": "q", "response": "a"},
]
"""One valid record of every shape the validators read; the generated ones are these, mutated."""


def mutated(base: dict, changes: dict, removed: set) -> dict:
    record = {k: v for k, v in base.items() if k not in removed}
    record.update(changes)
    return record


records = st.one_of(
    st.builds(mutated, st.sampled_from(VALID), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
              st.sets(st.sampled_from(FIELDS), max_size=2)),
    st.builds(mutated, st.sampled_from(VALID), st.dictionaries(st.sampled_from(FIELDS[:3]), messages.map(
        lambda m: [m]), max_size=2), st.just(set())),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
    json_values,
)

VALIDATORS = {
    "sft_messages": sft_messages, "prompt_messages": prompt_messages, "preference_pairs": preference_pairs,
    "labelled_completions": labelled_completions, "sampled_responses": sampled_responses,
    "scored_responses": scored_responses, "scoring_conversation": scoring_conversation,
}


def assert_one_line(error: BaseException, starts: str) -> None:
    """`error` is a DataError (a RecordError is one) whose message is one line beginning `starts`."""
    assert isinstance(error, DataError), f"{type(error).__name__} instead of a DataError: {error!r}"
    message = str(error)
    assert len(message.splitlines()) == 1 and message.startswith(starts), repr(message)


def texts_of(value) -> list[str]:
    """Every "content" string of the messages in a validator's result (lists, tuples, dataclasses)."""
    if dataclasses.is_dataclass(value):
        return texts_of([getattr(value, f.name) for f in dataclasses.fields(value)])
    if isinstance(value, dict):
        return [value["content"]] if "content" in value else []
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in texts_of(item)]
    return []


def validate_all(record, source: str, index: int) -> None:
    """Every validator accepts `record`, or raises a one-line RecordError naming source and record.
    What a validator accepts holds only valid Unicode text (a lone surrogate would fail later, in
    the tokenizer or when written as UTF-8)."""
    for name, validate in VALIDATORS.items():
        try:
            result = validate(record, source=source, index=index)
        except Exception as error:  # noqa: BLE001 — any other type is the failure this test looks for
            assert_one_line(error, f"{source}: record {index + 1}: ")
            continue
        for text in texts_of(result):
            assert isinstance(text, str) and text.strip(), (name, record)
            text.encode("utf-8")


@PROPERTY
@given(record=records)
@example(record={"prompt": "hi\ud800", "completion": "ok"})
@example(record={"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e308})
@example(record={"prompt": "q", "responses": ["a", "b"], "scores": [math.nan, 1]})
def test_every_generated_record_is_accepted_or_named_in_one_line(record):
    validate_all(record, "f.jsonl", 0)


def test_the_validators_accept_every_valid_shape():
    # The base records really are valid for their shape, so mutations start from accepted input.
    assert sft_messages(VALID[0], source="f", index=0)[-1] == {"role": "assistant", "content": "4"}
    assert sft_messages(VALID[1], source="f", index=0)[0]["content"] == "Add\n\n2 and 2"
    assert len(sft_messages(VALID[2], source="f", index=0)) == 3
    assert preference_pairs(VALID[3], source="f", index=0)[0].margin == 1.5
    assert preference_pairs(VALID[4], source="f", index=0)[0].rejected[0]["content"] == "go away"
    assert len(preference_pairs(VALID[5], source="f", index=0)) == 3
    assert labelled_completions(VALID[6], source="f", index=0)[0].label is True
    assert sampled_responses(VALID[7], source="f", index=0).finish_reasons == ["eos", "length"]
    assert scoring_conversation(VALID[8], source="f", index=0)[1] == [{"role": "assistant", "content": "a"}]


# ---------------------------------------------------------------- generated files

DAMAGE = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"[" * 3000, b"{", b"\x00", b"\r", b"\xef\xbb\xbf", b"", b"\n",
          b'"\\ud800"', b"NaN", b"[]", b"1e999"]
"""Byte damage: invalid and truncated UTF-8, an encoded surrogate, nesting deeper than the
recursion limit, a stray BOM, bare JSON values."""


def encoded(record, ensure_ascii: bool) -> bytes:
    # surrogatepass writes a lone surrogate as the (invalid) UTF-8 bytes a buggy exporter writes.
    return json.dumps(record, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


lines = st.one_of(st.builds(encoded, records, st.booleans()), st.sampled_from(DAMAGE), st.binary(max_size=12),
                  st.builds(lambda r, cut: encoded(r, True)[:cut], records, st.integers(0, 40)))


def first_bad_jsonl_line(data: bytes) -> int | None:
    """The 1-based line of `data` that read_records must name: the first that is not UTF-8, not
    JSON or not an object (blank lines are skipped); None when every line is a record."""
    for number, raw in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"), start=1):
        raw = raw[3:] if number == 1 and raw.startswith(codecs.BOM_UTF8) else raw
        try:
            text = raw.decode("utf-8")
            if text.strip() and not isinstance(json.loads(text), dict):
                return number
        except (ValueError, RecursionError):
            return number
    return None


@PROPERTY
@given(body=st.lists(lines, max_size=5), suffix=st.sampled_from([".jsonl", ".jsonl", ".json", ".csv"]))
@example(body=[b'{"prompt": "a", "completion": "b"}', b'{"prompt": "' + b"\xff\xfe" + b'"}'], suffix=".jsonl")
@example(body=[b'{"prompt": ' + b"[" * 100_000], suffix=".jsonl")
@example(body=[b"[" * 100_000], suffix=".json")
@example(body=[b"prompt,completion,margin", b"a,b,1e999"], suffix=".csv")
def test_every_generated_file_loads_or_names_its_line_in_one_line(body, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    data = b"\n".join(body) + b"\n"
    if suffix == ".json":  # the same lines as the items of a list, some of them damaged
        data = b"[" + b",".join(body) + b"]"
    path.write_bytes(data)
    try:
        loaded = read_records(path)
    except Exception as error:  # noqa: BLE001
        assert_one_line(error, f"{path}: ")
        if suffix == ".jsonl" and (bad := first_bad_jsonl_line(data)) is not None:
            assert f"line {bad}" in str(error), (str(error), bad)
        return
    assert suffix != ".jsonl" or first_bad_jsonl_line(data) is None
    assert loaded and all(isinstance(record, dict) for record in loaded)
    for index, record in enumerate(loaded):
        validate_all(record, str(path), index)


# ---------------------------------------------------------------- generated configs

YAML_SCALARS = ["1e-4", "-1e-5", "5E3", "1.0e-4", "1e999", ".nan", ".inf", "-.inf", "true", "yes", "null", "~",
                "[1, 2]", "{a: 1}", "'x'", "0", "-3", "2.5", "1_000", "0x10", "'1e-4'", ": :", "[[[[", "&a 1",
                "*a", "2020-01-01", "!!python/object:os.system", "'\\ud800'", "\"\\ud800\"", "|\n  two\n  lines",
                "fp32", "sigmoid", "orpo", "constant", "all", "x.jsonl", "99999999999999999999999"]
"""YAML 1.1 oddities (1e-4 is a string, yes is true, 0x10 is 16), non-finite floats, dates, tags,
anchors, block scalars, and ordinary good values."""

config_keys = st.one_of(st.sampled_from(sorted(set(field_types(SFTConfig)) | set(field_types(DPOConfig)))),
                        st.sampled_from(["max-steps", "nope", "1", "~", "[a]", "? x", "lr: 1"]))
config_values = st.one_of(st.sampled_from(YAML_SCALARS),
                          st.builds(lambda v: json.dumps(v, ensure_ascii=True), json_values))
yaml_texts = st.builds(lambda pairs: "".join(f"{k}: {v}\n" for k, v in pairs),
                       st.lists(st.tuples(config_keys, config_values), max_size=5))
yaml_files = st.one_of(yaml_texts.map(lambda t: ("data: x.jsonl\n" + t).encode("utf-8", "surrogatepass")),
                       yaml_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.sampled_from([b"", b"- 1\n- 2\n", b"just text", b"lr: \xff\n", b"[" * 3000,
                                        b"\xef\xbb\xbfdata: x.jsonl\n", b"data: x.jsonl\nlr: 1e999\n",
                                        b"data: x.jsonl\nepochs: .inf\n", b"data: x.jsonl\n1: 2\n"]))


def assert_config_line(error: BaseException, where: str) -> None:
    assert isinstance(error, ConfigError), f"{type(error).__name__} instead of a ConfigError: {error!r}"
    message = str(error)
    assert len(message.splitlines()) == 1 and message.startswith(where), repr(message)


def assert_usable(cfg) -> None:
    """An accepted config holds values of the declared types, and finite numbers."""
    for name, kind in field_types(type(cfg)).items():
        value = getattr(cfg, name)
        assert type(value) is kind, (name, value)
        assert kind is not float or math.isfinite(value), (name, value)


@PROPERTY
@given(text=yaml_files, cls=st.sampled_from([SFTConfig, DPOConfig]))
@example(text=b"data: x.jsonl\n1: 2\n", cls=SFTConfig)
@example(text=b"data: x.jsonl\nlr: \xff\n", cls=SFTConfig)
@example(text=b"data: x.jsonl\nepochs: .inf\n", cls=SFTConfig)
@example(text=b"[" * 3000, cls=SFTConfig)
def test_every_generated_yaml_config_builds_or_fails_in_one_line(text, cls, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(text)
    try:
        cfg = build_config(cls, str(path))
    except Exception as error:  # noqa: BLE001
        assert_config_line(error, f"{path}: " if not str(error).startswith("config: ") else "config: ")
        return
    assert_usable(cfg)


@PROPERTY
@given(key=st.one_of(config_keys, st.text(max_size=6)), value=json_values,
       cls=st.sampled_from(sorted(CONFIGS.values(), key=lambda c: c.__name__)))
def test_coerce_accepts_the_field_type_or_names_key_and_value(key, value, cls):
    try:
        out = coerce(cls, key, value, "flag")
    except Exception as error:  # noqa: BLE001
        assert_config_line(error, "flag: ")
        assert repr(key) in str(error) or f"{key}=" in str(error)
        return
    kind = field_types(cls)[key]
    assert type(out) is kind and (kind is not bool or isinstance(value, bool))


# ---------------------------------------------------------------- the command line

FLAG_VALUES = ["0", "-1", "-1e-5", "1e-4", "1e999", "-inf", "nan", "2.5", "abc", "", " ", "-x", "--", "fp32",
               "bf16", "cosine", "orpo", "drop", "1_0", "0x10", "\udcff", "true"]
"""Values of --flags: negative numbers (once parsed as options), overflow, NaN, text for numbers,
empty strings, an undecodable byte as a shell passes it (surrogateescape)."""

sft_flags = sorted(field_types(SFTConfig))


@pytest.fixture
def no_training(monkeypatch):
    """The sft trainer replaced by a recorder: the property is about parsing, not training. The
    parser is built once (building reads every config's source for the help texts, ~0.2 s)."""
    import posttrain.trainers.sft as sft

    started: list = []
    monkeypatch.setattr(sft, "train", started.append)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return started


@PROPERTY
@given(flags=st.lists(st.tuples(st.sampled_from(sft_flags), st.one_of(st.sampled_from(FLAG_VALUES),
                                                                       st.text(max_size=5))), max_size=4),
       yaml_text=st.one_of(st.none(), yaml_files))
@example(flags=[("lr", "-1e-5")], yaml_text=None)
@example(flags=[("epochs", "1e999")], yaml_text=None)
@example(flags=[], yaml_text=b"data: x.jsonl\n1: 2\n")
def test_every_generated_sft_command_line_starts_or_fails_in_one_line(flags, yaml_text, no_training,
                                                                      tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    argv = ["sft", "--model", "tiny-random", "--data", str(folder / "d.jsonl"), "--output-dir", str(folder / "o")]
    for name, value in flags:
        flag = "--" + name.replace("_", "-")
        if field_types(SFTConfig)[name] is bool:
            argv.append(flag if value in ("", "true") else "--no-" + flag[2:])
        else:
            argv += [flag, value]
    if yaml_text is not None:
        (folder / "c.yaml").write_bytes(yaml_text)
        argv += ["--config", str(folder / "c.yaml")]
    started = len(no_training)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse: usage lines, then one "posttrain sft: error: …" line
            code = exit_.code
            assert code == 2 and stderr.getvalue().splitlines()[-1].startswith("posttrain sft: error: argument ")
            return
    err = stderr.getvalue()
    if code == 0:
        assert len(no_training) == started + 1 and err == ""
        assert_usable(no_training[-1])
    else:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("posttrain sft: error: "), (code, err)
