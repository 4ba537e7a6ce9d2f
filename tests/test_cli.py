"""The CLI: every option listed with its default, bad values rejected before any model loads."""

from __future__ import annotations

import dataclasses
import json

import pytest

from posttrain.cli import build_parser, main
from posttrain.config import CONFIGS, ConfigError, SFTConfig, build_config, field_docs


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_lists_every_field_with_its_default(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    # argparse wraps lines (also at hyphens), so compare with all whitespace removed.
    text = "".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(CONFIGS[command]):
        assert "--" + f.name.replace("_", "-") in text
        assert f"(default:{f.default!r})" in text


def test_every_field_has_a_docstring():
    for cls in CONFIGS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: {missing}"


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.001\nbatch_size: 2\ndata: a.jsonl\n")
    cfg = build_config(SFTConfig, str(cfg_file), {"batch_size": 8})
    assert (cfg.lr, cfg.batch_size, cfg.data, cfg.grad_accum) == (0.001, 8, "a.jsonl", 1)


@pytest.mark.parametrize("argv, message", [
    (["sft", "--data", "x.jsonl", "--lr", "-1"], "lr=-1.0 must be > 0"),
    (["sft", "--data", "x.jsonl", "--precision", "fp16"], "precision='fp16' is not one of"),
    (["sft", "--data", "x.jsonl", "--batch-size", "0"], "batch_size=0 must be ≥ 1"),
    (["sft"], "data='' must name a data file"),
])
def test_bad_values_fail_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    import posttrain.models.load as load

    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        build_config(SFTConfig, str(bad))
    bad.write_text("batch_size: four\n")
    with pytest.raises(ConfigError, match="batch_size='four' should be of type int"):
        build_config(SFTConfig, str(bad))


def test_wrong_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--data", "x", "--batch-size", "2.5"])
    assert "batch_size='2.5' is not a valid int" in capsys.readouterr().err


def test_generate_on_the_tiny_model(capsys):
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", "--prompt", "yo",
                 "--max-new-tokens", "4", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "### hi" in out and "### yo" in out


def test_sft_command_end_to_end(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    assert main(["sft", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "2", "--precision", "fp32"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    resolved = build_config(SFTConfig, str(out / "config.yaml"))
    assert resolved.max_steps == 2 and resolved.model == "tiny-random"


@pytest.mark.parametrize("text, message", [
    ("eval_data: ' '\n", "eval_data=' ' is blank (only spaces or invisible characters)"),
    ("chat_template: \"\\u200b\"\n", "chat_template='\\u200b' is blank"),
    ("output_dir: \"out\\u200b\"\n", "output_dir='out\\u200b' holds a hidden character, U+200B (ZERO WIDTH SPACE) "
                                         "at position 4"),
    ("max_steps: '2'\nmax_length: \"+64\"\n", None),      # quoted whole numbers read as ints
    ("max_steps: '2.5'\n", "max_steps='2.5' should be of type int"),
])
def test_yaml_blank_strings_and_quoted_ints(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: d.jsonl\n" + text)
    if message is None:
        cfg = build_config(SFTConfig, str(path))
        assert (cfg.max_steps, cfg.max_length) == (2, 64)
        return
    with pytest.raises(ConfigError) as err:
        build_config(SFTConfig, str(path))
    assert message in str(err.value), str(err.value)


def test_a_newline_stop_string_is_not_blank():
    from posttrain.config import GRPOConfig

    cfg = build_config(GRPOConfig, None, {"data": "p.jsonl", "judges": "fn:m:f", "stop_strings": "\n"})
    assert cfg.stop_strings == "\n"


def test_a_key_given_twice_in_yaml_is_refused(tmp_path):
    from posttrain.recipes import RecipeError, run_recipe

    path = tmp_path / "c.yaml"
    path.write_text("data: d.jsonl\nmax_steps: 1\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(key 'max_steps' is given twice \(line 3\)"):
        build_config(SFTConfig, str(path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {name: a, kind: sft, model: m, data: d, lr: 1e-5, lr: 2e-5}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML \(key 'lr' is given twice"):
        run_recipe(recipe, echo=lambda line: None)
    path.write_text("data: d.jsonl\nmax_steps: 1\nnested: {a: 1}\n")   # the same key in two mappings is fine
    with pytest.raises(ConfigError, match="unknown key 'nested'"):
        build_config(SFTConfig, str(path))


def test_an_inductor_cache_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    # a fresh user's finding: every command failed inside torch with "FILE: File exists"
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"posttrain generate: error: TORCHINDUCTOR_CACHE_DIR='{tmp_path / 'cache'}' is a file, not a "
                   "folder: torch keeps compiled kernels in a folder there; name a folder or unset it"], err
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "gone"))
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "TORCHINDUCTOR_CACHE_DIR=" + repr(str(tmp_path / "gone")) + " is a broken link, not a folder" in \
        capsys.readouterr().err
