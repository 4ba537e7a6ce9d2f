"""Bad inputs end in one line naming file, record, field or value and a non-zero exit, at once:
never a traceback, a ~50 s wait on the Hub, or a line that points at the wrong cause."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from posttrain.cli import _join_negative_numbers, error_line, main
from posttrain.config import SFTConfig, build_config
from posttrain.data import DataError, load_preference_pairs, read_records
from posttrain.models.tiny import build_tiny_tokenizer

# Every in-process sft run uses fp32: accelerate keeps one mixed-precision setting per process.
pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, argv, code=2) -> str:
    """The one error line of `posttrain argv` (progress bars of model loading may precede it)."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("posttrain "), err
    assert sum(line.startswith("posttrain ") for line in err.splitlines()) == 1, err
    return err.splitlines()[-1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------- data files

def test_non_utf8_jsonl_and_json_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "hi", "completion": "ok"}\n{"prompt": "\xff\xfe", "completion": "x"}\n')
    # Line 2 starts {"prompt": " (12 characters), so 0xff is at column 13; in bad.json {"prompt": "caf
    # is 15 characters, so 0xe9 is at column 16.
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not UTF-8 text \(byte 0xff at column 13\)"):
        read_records(bad)
    whole = tmp_path / "bad.json"
    whole.write_bytes(b'[\n{"prompt": "caf\xe9", "completion": "x"}\n]')
    with pytest.raises(DataError, match=r"bad.json: line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_records(whole)
    table = tmp_path / "bad.csv"
    table.write_bytes(b"prompt,completion\nhi,ok\nna\xefve,x\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: not UTF-8 text \(byte 0xef at column 3\)"):
        read_records(table)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder.jsonl: not a file$"):
        read_records(tmp_path / "folder.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "hi", "completion": "ok"}\n')
    assert read_records(bom) == [{"prompt": "hi", "completion": "ok"}]


def test_deeply_nested_record_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "hi", "completion": "ok"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="deep.jsonl: line 2: JSON nested too deeply"):
        read_records(deep)
    err = one_line_error(capsys, ["sft", "--precision", "fp32", "--data", str(deep),
                                  "--output-dir", str(tmp_path / "o"),
                                  "--model", "tiny-random"])
    assert "line 2: JSON nested too deeply" in err


def test_txt_and_missing_local_data_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"^nope.txt: no such file or folder$"):
        read_records("nope.txt")
    with pytest.raises(DataError, match=r"^\./data/nope: no such file or folder$"):
        read_records("./data/nope")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'"):
        read_records("data.txt")
    assert time.monotonic() - start < 5  # was ~25 s of hub retries


def test_identically_tokenised_pair_is_dropped_and_counted(tmp_path):
    # The tiny tokenizer maps every character outside its alphabet to <unk>: "é" and "ü" are
    # different text and the same tokens, so that pair's loss would be a constant.
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "é", "rejected": "ü"},
                                                  {"prompt": "q", "chosen": "yes", "rejected": "no"}])
    pairs, report = load_preference_pairs(data, build_tiny_tokenizer(), max_length=64)
    assert len(pairs) == 1 and report.dropped["chosen and rejected tokenise identically"] == 1
    assert "dropped 1 (chosen and rejected tokenise identically: 1)" in report.summary()


# ---------------------------------------------------------------- config and flags

def test_yaml_scientific_floats(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: x.jsonl\nlr: 1e-4\nadam_eps: 5E-9\nmax_grad_norm: 2e0\n")
    cfg = build_config(SFTConfig, str(config))
    assert (cfg.lr, cfg.adam_eps, cfg.max_grad_norm) == (1e-4, 5e-9, 2.0)
    config.write_text("data: x.jsonl\nlr: fast\n")
    with pytest.raises(ValueError, match="lr='fast' should be of type float"):
        build_config(SFTConfig, str(config))


def test_a_bad_value_from_yaml_is_named_by_its_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: x.jsonl\nlr: .nan\n")
    with pytest.raises(ValueError, match=f"^{config}: lr=nan must be a finite number$"):
        build_config(SFTConfig, str(config))
    with pytest.raises(ValueError, match="^config: lr=-1.0 must be > 0$"):   # a flag's value
        build_config(SFTConfig, str(config), {"lr": -1.0})


def test_yaml_bools_take_the_words_flags_take(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('data: x.jsonl\npacking: "yes"\ntrain_on_prompt: "False"\ngradient_checkpointing: true\n'
                      'skip_invalid: 1\n')
    cfg = build_config(SFTConfig, str(config))
    assert (cfg.packing, cfg.train_on_prompt, cfg.gradient_checkpointing, cfg.skip_invalid) == (True, False, True, True)
    for line, shown in (("skip_invalid: 2", "skip_invalid=2"), ('packing: "maybe"', "packing='maybe'"),
                        ("packing: 1.5", "packing=1.5")):
        config.write_text(f"data: x.jsonl\n{line}\n")
        with pytest.raises(ValueError, match=f"{shown} should be of type bool"):
            build_config(SFTConfig, str(config))


def test_a_folder_given_for_a_config_or_data_file_is_named_as_one(tmp_path):
    from posttrain.data import DataError
    from posttrain.data.records import read_records

    with pytest.raises(ValueError, match=f"^{tmp_path}: a folder, not a YAML file$"):
        build_config(SFTConfig, str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty'}: a folder, but neither a saved dataset "
                                        r"\(save_to_disk\) nor data files datasets.load_dataset can read"):
        read_records(tmp_path / "empty")


def test_negative_scientific_flag_reaches_the_config(capsys):
    assert _join_negative_numbers(["--lr", "-1e-5", "--seed", "-3"]) == ["--lr=-1e-5", "--seed=-3"]
    assert _join_negative_numbers(["--resume", "--data", "x"]) == ["--resume", "--data", "x"]
    # Was "argument --lr: expected one argument"; now the config's own check speaks.
    err = one_line_error(capsys, ["sft", "--precision", "fp32", "--data", "x.jsonl", "--lr", "-1e-5"])
    assert "config: lr=-1e-05 must be > 0" in err


def test_os_errors_and_recursion_read_as_one_line():
    assert error_line(OSError(28, "No space left on device", "/runs/a/model.safetensors")) == \
        "/runs/a/model.safetensors: No space left on device"
    assert "nested too deeply" in error_line(RecursionError("maximum recursion depth exceeded"))
    assert error_line(ValueError("a\n  b")) == "a b"
    # Spaces inside a line are part of what it quotes: a blank value stays visibly blank.
    assert error_line(ValueError("record 3: field 'prompt' is '   '")) == "record 3: field 'prompt' is '   '"


def test_a_word_after_a_yes_no_flag_is_read_or_refused_by_name(capsys):
    from posttrain.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["grpo", "--prefix-sharing", "false"]).prefix_sharing is False
    assert parse(["grpo", "--prefix-sharing", "YES"]).prefix_sharing is True
    assert parse(["grpo", "--no-prefix-sharing"]).prefix_sharing is False
    for argv in (["--prefix-sharing", "maybe"], ["--no-prefix-sharing", "false"]):
        with pytest.raises(SystemExit):
            parse(["grpo", *argv])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --prefix-sharing/--no-prefix-sharing:" in err and repr(argv[1]) in err, err
        assert "unrecognized" not in err


def test_sample_reads_skip_invalid_as_the_trainers_do_and_help_shows_the_word(capsys):
    from posttrain.cli import build_parser

    parser = build_parser()
    base = ["sample", "--data", "d.jsonl", "--output", "o.jsonl"]
    assert parser.parse_args(base).skip_invalid is False
    assert parser.parse_args([*base, "--skip-invalid"]).skip_invalid is True
    assert parser.parse_args([*base, "--skip-invalid", "yes"]).skip_invalid is True
    assert parser.parse_args([*base, "--skip-invalid", "off"]).skip_invalid is False
    # The other commands' yes/no settings read a word the same way.
    judge = ["judge", "--data", "s.jsonl", "--judge", "fn:m:f", "--output", "o.jsonl"]
    assert parser.parse_args([*judge, "--keep-all", "no"]).keep_all is False
    assert parser.parse_args([*judge, "--keep-all"]).keep_all is True
    assert parser.parse_args(["best-of-n", "--data", "s", "--output", "o", "--keep-cut-off", "yes"]).keep_cut_off is True
    evaluate = ["eval", "--model", "m", "--baseline", "b", "--data", "d", "--judge", "fn:m:f", "--output-dir", "o"]
    assert parser.parse_args([*evaluate, "--judge-used-in-training", "false"]).judge_used_in_training is False
    with pytest.raises(SystemExit):
        parser.parse_args(["grpo", "--help"])
    assert "--prefix-sharing [true|false], --no-prefix-sharing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, prog", [(["sft", "--bogus", "1"], "posttrain sft"),
                                        (["sample", "--data", "d", "--output", "o", "extra"], "posttrain sample"),
                                        (["annotate", "status", "--db", "x", "--bogus"], "posttrain annotate status"),
                                        # Named before the subcommand a group command lacks.
                                        (["annotate", "--bogus"], "posttrain annotate"),
                                        (["data", "--bogus"], "posttrain data"), (["--bogus"], "posttrain")])
def test_unrecognized_arguments_are_reported_by_their_subcommand(argv, prog, capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert lines[0].startswith(f"usage: {prog} ") and lines[-1].startswith(f"{prog}: error: unrecognized arguments: ")


def test_an_error_after_a_progress_bar_starts_its_own_line(capsys, monkeypatch):
    from tqdm import tqdm

    import posttrain.cli as cli

    def failing_run(args):
        bar = tqdm(total=3, desc="grpo", file=sys.stderr)
        bar.update(1)
        raise ValueError("fn:rewards:score: returned 'NaN' for record 2")

    monkeypatch.setattr(cli, "run_generate", failing_run)
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "\nposttrain generate: error: fn:rewards:score: returned 'NaN' for record 2" in err, repr(err)


# ---------------------------------------------------------------- the CLI boundary

def test_data_subcommand_named_and_debug_shows_traceback(tmp_path, capsys, monkeypatch):
    argv = ["data", "mix", str(tmp_path / "none.jsonl"), "--n", "1", "--output", str(tmp_path / "o.jsonl")]
    err = one_line_error(capsys, argv)
    assert err.startswith("posttrain data mix: error: ")
    with pytest.raises(ValueError):
        main(argv + ["--debug"])
    monkeypatch.setenv("POSTTRAIN_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)


def test_unexpected_error_is_one_line_pointing_at_debug(tmp_path, capsys, monkeypatch):
    import posttrain.scoring.files as files

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(files, "score_file", broken)
    err = one_line_error(capsys, ["score", "--judge", "fn:m:f", "--data", "x.jsonl"], code=1)
    assert err == "posttrain score: internal error: KeyError: 'bug' (run again with --debug for the traceback)"
    with pytest.raises(KeyError):
        main(["--debug", "score", "--judge", "fn:m:f", "--data", "x.jsonl"])


def test_output_dir_file_score_output_folder_surrogate(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "ok"}])
    (tmp_path / "afile").write_text("x")
    err = one_line_error(capsys, ["sft", "--precision", "fp32", "--data", data, "--output-dir", str(tmp_path / "afile"),
                                  "--model", "tiny-random", "--max-steps", "1"])
    assert "afile" in err and "is a file" in err
    scored = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "response": "ok"}])
    err = one_line_error(capsys, ["score", "--judge", "fn:math:nope", "--data", scored, "--output", str(tmp_path)])
    assert "is a folder" in err  # checked before the judge is even loaded
    (tmp_path / "surr.jsonl").write_text('{"prompt": "hi \\ud800", "completion": "ok"}\n')
    err = one_line_error(capsys, ["sft", "--precision", "fp32", "--data", str(tmp_path / "surr.jsonl"),
                                  "--model", "tiny-random",
                                  "--output-dir", str(tmp_path / "o2")])
    assert "record 1: field 'prompt'" in err and "lone surrogate" in err


def test_posttrain_cache_pointing_at_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cachefile"))
    err = one_line_error(capsys, ["generate", "--model", "tiny-random", "--prompt", "hi"])
    assert "POSTTRAIN_CACHE=" in err and "is a file" in err


# ---------------------------------------------------------------- models

def test_missing_local_model_fails_at_once(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from posttrain.models import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"model 'out/nope': no such folder$"):
        resolve_model_path("out/nope")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path("./nope")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache .*offline mode"):
        resolve_model_path("someorg/not-a-cached-model")
    err = one_line_error(capsys, ["generate", "--model", "out/nope", "--prompt", "hi"])
    assert err == "posttrain generate: error: model 'out/nope': no such folder"
    assert time.monotonic() - start < 5  # was ~50 s of hub retries and a traceback


def test_empty_or_foreign_model_folder(tmp_path, capsys):
    from posttrain.models import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model folder .*empty' is empty"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    err = one_line_error(capsys, ["generate", "--model", str(tmp_path / "run"), "--prompt", "hi"])
    assert "holds no config.json or adapter_config.json or tokenizer_config.json" in err
    assert "sentencepiece" not in err


def test_lora_adapter_folder_as_model(tmp_path, tiny_path, capsys):
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.models.lora import apply_lora, save_model

    base = load_causal_lm(str(tiny_path))
    lora = apply_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # a non-zero B, so the adapter changes the output
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    adapter = save_model(lora, load_tokenizer(str(tiny_path)), tmp_path / "adapter", merge_lora=False)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = load_causal_lm(str(adapter))
    with torch.no_grad():
        expected, got = lora(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert not isinstance(loaded, type(lora)) and torch.allclose(got, expected, atol=1e-5)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "ok"}] * 2)
    assert main(["sft", "--model", str(adapter), "--data", data, "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "1", "--batch-size", "2", "--precision", "fp32"]) == 0, capsys.readouterr().err[-500:]


# ---------------------------------------------------------------- reward functions

def test_reward_function_numpy_scores_and_broken_module(tmp_path, monkeypatch):
    from posttrain.scoring.function import call_reward_fn, load_reward_fn

    scores = call_reward_fn(lambda p, r: [np.float32(0.5), np.int64(2)], "fn:m:f", ["a", "b"], ["c", "d"])
    assert scores == [0.5, 2.0] and all(type(s) is float for s in scores)
    with pytest.raises(ValueError, match=r"score 0 is True"):
        call_reward_fn(lambda p, r: [True], "fn:m:f", ["a"], ["c"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_reward_mod.py").write_text("x = undefined_name\n")
    with pytest.raises(ValueError, match=r"^fn:broken_reward_mod:f: importing 'broken_reward_mod' failed with "
                                         r"NameError: name 'undefined_name' is not defined$"):
        load_reward_fn("broken_reward_mod:f")
    (tmp_path / "exiting_reward_mod.py").write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(ValueError, match=r"^fn:exiting_reward_mod:f: importing 'exiting_reward_mod' failed with "
                                         r"SystemExit: 2$"):
        load_reward_fn("exiting_reward_mod:f")


def test_reward_function_bad_returns_and_signature(tmp_path, monkeypatch):
    from posttrain.scoring.function import call_reward_fn, load_reward_fn

    cases = [(lambda p, r: None, r"^fn:m:f: returned None, expected a list of 1 numbers$"),
             (lambda p, r: 0.5, r"^fn:m:f: returned a float \(0.5\), expected a list of 1 numbers$"),
             (lambda p: [1.0], r"^fn:m:f: raised TypeError: .*positional argument"),
             (lambda p, r: 1 / 0, r"^fn:m:f: raised ZeroDivisionError: division by zero$")]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            call_reward_fn(fn, "fn:m:f", ["a"], ["c"])
    # The README's `--reward-fn mytask:reward`: ./mytask.py is found though the `posttrain`
    # script's sys.path does not hold the current folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mytask_reliability.py").write_text("def reward(prompts, responses):\n"
                                                    "    return [float(len(r)) for r in responses]\n")
    assert call_reward_fn(load_reward_fn("mytask_reliability:reward"), "fn:x", ["a"], ["abc"]) == [3.0]


def test_score_refuses_responses_beyond_the_models_positions(tmp_path, tiny_path, capsys):
    from posttrain.models.reward import RewardModel

    RewardModel.from_causal_lm(str(tiny_path)).save_pretrained(tmp_path / "rm")
    # The tiny model has 2048 positions; one character is one token, so 3000 characters overflow.
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi", "response": "ok"},
                                                 {"prompt": "hi", "response": "a" * 3000}])
    err = one_line_error(capsys, ["score", "--model", str(tmp_path / "rm"), "--data", data,
                                  "--output", str(tmp_path / "out.jsonl")])
    assert "long.jsonl: record 2: rm:" in err and "3022 tokens, more than the model's 2048 positions" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_ctrl_c_outside_a_trainers_signal_handler_is_one_line(capsys, monkeypatch):
    import posttrain.scoring.files as files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(files, "score_file", interrupted)
    err = one_line_error(capsys, ["score", "--judge", "fn:m:f", "--data", "x.jsonl"], code=130)
    assert err == "posttrain score: interrupted"


def test_full_disk_while_writing_is_one_line(capsys, monkeypatch):
    import safetensors

    import posttrain.scoring.files as files

    def full(*args, **kwargs):  # what safetensors raises when the disk fills during a save
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(files, "score_file", full)
    err = one_line_error(capsys, ["score", "--judge", "fn:m:f", "--data", "x.jsonl"])
    assert err.startswith("posttrain score: error: no space left on device (Error while serializing")
    monkeypatch.setattr(files, "score_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device", "/runs/a/model.safetensors")))
    err = one_line_error(capsys, ["score", "--judge", "fn:m:f", "--data", "x.jsonl"])
    assert err == "posttrain score: error: /runs/a/model.safetensors: No space left on device"


def test_a_blank_generate_prompt_is_shown_as_given(capsys):
    err = one_line_error(capsys, ["generate", "--model", "tiny-random", "--prompt", "hi", "--prompt", "   "])
    assert err == "posttrain generate: error: --prompt 2: expected a non-empty message, got '   '"
    err = one_line_error(capsys, ["generate", "--model", "tiny-random", "--prompt", "\u200b"])
    assert err == "posttrain generate: error: --prompt 1: expected a non-empty message, got '\\u200b'"
    err = one_line_error(capsys, ["generate", "--model", "tiny-random", "--prompt", "hi", "--system", " \u200b"])
    assert err == "posttrain generate: error: --system: expected a non-empty message, got ' \\u200b'"
    err = one_line_error(capsys, ["generate", "--model", "tiny-random", "--prompt", "hi", "--system", "ab\udcffcd"])
    assert err == ("posttrain generate: error: --system: character 2 is not valid Unicode text ('\\udcff', "
                   "an undecodable byte?)")


@pytest.mark.parametrize("argv, prog, message", [
    (["annotate"], "posttrain annotate", "the following arguments are required: ACTION (one of serve, add"),
    (["data"], "posttrain data", "the following arguments are required: DATA_COMMAND (one of "),
    ([], "posttrain", "the following arguments are required: COMMAND (one of sft, "),
])
def test_a_group_command_without_its_subcommand_lists_them(argv, prog, message, capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines[-1].startswith(f"{prog}: error: {message}"), lines


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--data", "d.jsonl", "--output", " "], "--output"),
    (["score", "--data", "\u200b", "--judge", "fn:m:f"], "--data"),
    (["judge", "--data", "s.jsonl", "--judge", "fn:m:f", "--output", "\t"], "--output"),
    (["best-of-n", "--data", "s.jsonl", "--output", "\ufeff"], "--output"),
    (["eval", "--model", "m", "--baseline", " ", "--data", "d", "--judge", "fn:m:f", "--output-dir", "o"], "--baseline"),
    (["data", "mix", "a.jsonl", " ", "--n", "2", "--output", "o.jsonl"], "SOURCE[:WEIGHT]"),
    (["sft", "--data", "d.jsonl", "--output-dir", "\u200b"], "--output-dir"),
    (["run", " "], "recipe"),
    (["sample", "--data", "", "--output", "o.jsonl"], "--data"),
])
def test_a_blank_file_argument_is_refused_as_it_is_parsed(argv, flag, capsys, tmp_path, monkeypatch):
    from posttrain.cli import main
    from posttrain.data.errors import is_blank

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    blank = next(a for a in argv if is_blank(a))
    assert len(lines) == 1, lines   # one line: no usage block, the flag itself was right
    assert stop.value.code == 2 and f"error: argument {flag}: {blank!r} is blank; it must name" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag, shown, hidden", [
    (["sft", "--data", "s.jsonl\u200b", "--output-dir", "o"], "--data", "'s.jsonl\\u200b'",
     "U+200B (ZERO WIDTH SPACE) at position 8"),
    (["sample", "--data", "d.jsonl", "--output", "\ufeffo.jsonl"], "--output", "'\\ufeffo.jsonl'",
     "U+FEFF (ZERO WIDTH NO-BREAK SPACE) at position 1"),
    (["eval", "--model", "m", "--baseline", "b", "--data", "d", "--judge", "fn:m:f", "--output-dir", "o\tut"],
     "--output-dir",
     "'o\\tut'", "U+0009 (control character) at position 2"),
])
def test_a_file_argument_with_a_hidden_character_is_refused(argv, flag, shown, hidden, capsys, tmp_path,
                                                            monkeypatch):
    # a fresh user's finding: "s.jsonl\u200b" was taken, and an output file would be named by it
    from posttrain.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert f"error: argument {flag}: {shown} holds a hidden character, {hidden}; type the name again" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, found", [
    ("données/é.jsonl", None), ("a b.jsonl", None),
    ("👨\u200d👩\u200d👧.jsonl", None),                  # joiners inside an emoji sequence
    ("می\u200cخواهم.jsonl", None),                       # and inside a Persian word: real names
    ("a\u200d.jsonl", None),
    ("a.jsonl\u200d", "U+200D (ZERO WIDTH JOINER) at position 8"),
    ("\u200ca", "U+200C (ZERO WIDTH NON-JOINER) at position 1"),
    ("ob\udcff", "U+DCFF (the byte 0xFF, not UTF-8) at position 3"),   # argv's undecodable byte
    ("o\u2028", "U+2028 (LINE SEPARATOR) at position 2"),
    ("o\n", "U+000A (control character) at position 2"),
])
def test_which_characters_in_a_name_are_hidden(text, found):
    from posttrain.data.errors import invisible_character

    assert invisible_character(text) == found


@pytest.mark.parametrize("value, message", [
    ("\u200b=tiny-random", "--model '\\u200b=tiny-random': label is blank; give LABEL=MODEL or MODEL"),
    ("a= ", "--model 'a= ': model is blank"),
    (" =tiny-random", "--model ' =tiny-random': label is blank"),
])
def test_eval_labels_and_models_must_not_be_blank(value, message):
    from posttrain.eval.cli import labelled_all

    with pytest.raises(ValueError) as err:
        labelled_all("--model", [value])
    assert str(err.value).startswith(message)
    assert labelled_all("--model", ["dpo=outputs/dpo", "tiny-random"]) == {"dpo": "outputs/dpo",
                                                                           "tiny-random": "tiny-random"}


@pytest.mark.parametrize("source", [" :1", "\u200b:0.5", "\t:0.5", ":2"])
def test_a_mix_source_blank_before_its_weight_is_refused(source):
    from posttrain.datagen.mix import parse_source

    with pytest.raises(ValueError, match="no source before the weight"):
        parse_source(source)


def test_blank_texts_in_a_recipes_function_stage_are_refused_before_anything_runs(tmp_path):
    from posttrain.recipes import RecipeError, run_recipe

    stages = [{"name": "a", "kind": "sft", "model": "tiny-random", "data": "d.jsonl"},
              {"name": "c", "kind": "concat", "files": ["${a}", " "]}]
    with pytest.raises(RecipeError, match=r"stage 'c' \(concat\): files=\['.*', ' '\] holds a blank text ' '"):
        run_recipe({"output_dir": str(tmp_path / "out"), "stages": stages}, echo=lambda line: None)
    stages[1] = {"name": "s", "kind": "sample", "model": "${a}", "data": "\u200b"}
    with pytest.raises(RecipeError, match=r"stage 's' \(sample\): data='\\u200b' holds a blank text"):
        run_recipe({"output_dir": str(tmp_path / "out"), "stages": stages}, echo=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_an_empty_eval_data_flag_still_means_none(tmp_path):
    from posttrain.cli import build_parser, parse_command_line

    args = parse_command_line(build_parser(), ["sft", "--data", "d.jsonl", "--eval-data", ""])
    assert args.eval_data == ""
