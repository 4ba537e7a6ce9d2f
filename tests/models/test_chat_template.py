"""Chat templates for base models: which tokens a template adds, the EOS it sets, the mean rows
the model gains, the errors for bad templates, and `posttrain chat-template`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.config import ConfigError, SFTConfig, build_config
from posttrain.models import fit_model_to_tokenizer, install_chat_template, load_tokenizer
from posttrain.models.chat_template import CHATML_TEMPLATE, load_tokenizer_with_template
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_base_tokenizer, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

# Llama-3's header / end-of-turn markers, one statement a line so a syntax error has a line to name.
LLAMA3_LIKE = """{% for message in messages %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}
"""


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    """A base model folder: the tiny Llama over a tokenizer with no template, no ChatML tokens, no pad."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = build_tiny_base_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_base_model_is_refused_with_the_flag_to_use(base_path):
    with pytest.raises(ValueError, match=r"no chat_template.*--chat-template chatml\|FILE.jinja\|from:MODEL"):
        load_tokenizer(str(base_path))


def test_chatml_adds_its_two_tokens_and_makes_im_end_eos_and_pad():
    tokenizer = build_tiny_base_tokenizer()  # 99 tokens: <unk>, <|endoftext|>, 97 characters
    change = install_chat_template(tokenizer, "chatml", name="base")
    assert change.added_tokens == ("<|im_start|>", "<|im_end|>")
    assert change.new_token_ids == (99, 100) and change.old_vocab_size == 99 and len(tokenizer) == 101
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 100
    # The same text as the instruct tiny model's ChatML, and each marker one token.
    rendered = tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(99) == 2 and ids.count(100) == 2 and len(ids) == 4 + len("user\nhi\nassistant\nhello\n")
    prompt = tokenizer.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # Replies decode without the markers (they are special).
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\nhello\n"


def test_a_pad_token_the_tokenizer_has_is_kept():
    tokenizer = build_tiny_base_tokenizer()
    tokenizer.pad_token = "<unk>"
    change = install_chat_template(tokenizer, "chatml", name="base")
    assert change.pad_token == tokenizer.pad_token == "<unk>" and tokenizer.eos_token == "<|im_end|>"


def test_a_template_ending_turns_with_the_existing_eos_adds_only_role_markers(tmp_path):
    tokenizer = build_tiny_base_tokenizer()
    spec = write(tmp_path / "zephyr.jinja",
                 "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    change = install_chat_template(tokenizer, spec, name="base")
    # <|endoftext|> is already a special token: only the role markers are new.
    assert change.added_tokens == ("<|user|>", "<|assistant|>")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert change.new_token_ids == (99, 100)


def test_a_jinja_file_installs_with_its_end_of_turn_marker_as_eos(tmp_path):
    tokenizer = build_tiny_base_tokenizer()
    change = install_chat_template(tokenizer, write(tmp_path / "llama3.jinja", LLAMA3_LIKE), name="base")
    assert change.added_tokens == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.chat_template == LLAMA3_LIKE


def test_new_rows_are_the_mean_of_the_old_ones_and_ids_reach_config():
    tokenizer = build_tiny_base_tokenizer()
    model = build_tiny_model(tokenizer)  # tied embeddings, 99 rows
    before = model.get_input_embeddings().weight.detach().clone()
    change = install_chat_template(tokenizer, "chatml", name="base")
    fit_model_to_tokenizer(model, tokenizer, change)
    weight = model.get_input_embeddings().weight
    assert weight.shape == (101, 64) and model.config.vocab_size == 101
    torch.testing.assert_close(weight[:99], before, rtol=0, atol=0)
    mean = before.mean(dim=0)
    torch.testing.assert_close(weight[99], mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(weight[100], mean, rtol=0, atol=1e-7)
    assert model.get_output_embeddings().weight is weight  # still tied
    for config in (model.config, model.generation_config):
        assert (config.eos_token_id, config.pad_token_id) == (100, 100)
    # The model runs over the new ids.
    logits = model(torch.tensor([[99, 60, 100]])).logits
    assert logits.shape == (1, 3, 101) and torch.isfinite(logits).all()


def test_an_untied_head_and_its_bias_get_their_own_means():
    tokenizer = build_tiny_base_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(99, 64, generator=g))
    model.lm_head.bias = torch.nn.Parameter(torch.randn(99, generator=g))
    head_before = model.lm_head.weight.detach().clone()
    bias_before = model.lm_head.bias.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    change = install_chat_template(tokenizer, "chatml", name="base")
    fit_model_to_tokenizer(model, tokenizer, change)
    head = model.get_output_embeddings()
    assert head.weight is not model.get_input_embeddings().weight and head.weight.shape == (101, 64)
    torch.testing.assert_close(head.weight[:99], head_before, rtol=0, atol=0)
    torch.testing.assert_close(head.weight[99:], head_before.mean(0).expand(2, 64), rtol=0, atol=1e-7)
    torch.testing.assert_close(head.bias[99:], bias_before.mean().expand(2), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.get_input_embeddings().weight[99:], embed_before.mean(0).expand(2, 64),
                               rtol=0, atol=1e-7)


def test_a_padded_matrix_keeps_its_size_and_its_spare_rows_under_new_ids_take_the_mean():
    # Pythia-style: 128 rows for 99 tokens. The new ids 99 and 100 land on spare rows.
    tokenizer = build_tiny_base_tokenizer()
    model = build_tiny_model(tokenizer)
    model.resize_token_embeddings(128, mean_resizing=False)
    before = model.get_input_embeddings().weight.detach().clone()
    fit_model_to_tokenizer(model, tokenizer, install_chat_template(tokenizer, "chatml", name="base"))
    weight = model.get_input_embeddings().weight
    assert weight.shape == (128, 64)
    torch.testing.assert_close(weight[99:101], before[:99].mean(0).expand(2, 64), rtol=0, atol=1e-7)
    torch.testing.assert_close(weight[101:], before[101:], rtol=0, atol=0)


def test_from_model_copies_its_template(tiny_path, base_path):
    tokenizer = build_tiny_base_tokenizer()
    change = install_chat_template(tokenizer, f"from:{tiny_path}", name="base")
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert change.added_tokens == ("<|im_start|>", "<|im_end|>") and tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match=r"from:.*has no chat template to copy"):
        install_chat_template(build_tiny_base_tokenizer(), f"from:{base_path}", name="base")
    with pytest.raises(ValueError, match=r"from:.*cannot load the tokenizer"):
        install_chat_template(build_tiny_base_tokenizer(), f"from:{base_path.parent}", name="base")


def test_from_model_also_adds_that_models_special_tokens_the_template_writes(tmp_path):
    # Mistral's way: [INST] … [/INST] are special tokens of its tokenizer, not <…> markers.
    source = build_tiny_base_tokenizer()
    source.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
    source.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                            "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    source.save_pretrained(tmp_path / "mistral-like")
    tokenizer = build_tiny_base_tokenizer()
    change = install_chat_template(tokenizer, f"from:{tmp_path / 'mistral-like'}", name="base")
    assert change.added_tokens == ("[INST]", "[/INST]") and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("[INST] hi [/INST]", add_special_tokens=False)["input_ids"][0] == 99


def test_a_model_with_a_template_gets_it_replaced_with_a_warning(tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain.models.chat_template"):
        change = install_chat_template(tiny_tokenizer, write(tmp_path / "l3.jinja", LLAMA3_LIKE), name="tiny")
    assert change.replaced and "replacing it" in caplog.text
    assert tiny_tokenizer.chat_template == LLAMA3_LIKE and tiny_tokenizer.eos_token == "<|eot_id|>"
    # The kept pad (<|im_end|>) is still a token; ChatML's markers were already there.
    assert tiny_tokenizer.pad_token == "<|im_end|>" and change.new_token_ids == (100, 101, 102)


@pytest.mark.parametrize("text, message", [
    ("{% for m in messages %}\n{{ m['content'] }}\n{% endfor\n", r"bad\.jinja: line 3: Jinja syntax error"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
     r"bad\.jinja: the template ends an assistant turn with no marker"),
    # Role markers open turns but none closes one: the next turn's marker is no end of this one.
    ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}",
     r"bad\.jinja: the template ends an assistant turn with no marker after the reply \('Probe reply one\.\\n';"),
    ("{{ raise_exception('no system role here') }}", r"bad\.jinja: rendering .* failed: no system role here"),
    ("  \n", r"bad\.jinja: empty chat template"),
])
def test_bad_jinja_files_are_refused_and_the_tokenizer_is_untouched(tmp_path, text, message):
    tokenizer = build_tiny_base_tokenizer()
    with pytest.raises(ValueError, match=message):
        install_chat_template(tokenizer, write(tmp_path / "bad.jinja", text), name="base")
    assert tokenizer.chat_template is None and len(tokenizer) == 99 and tokenizer.eos_token == "<|endoftext|>"


def test_unknown_specs_and_missing_files(tmp_path):
    tokenizer = build_tiny_base_tokenizer()
    with pytest.raises(ValueError, match=r"'llama' is not one of chatml \| FILE.jinja \| from:MODEL"):
        install_chat_template(tokenizer, "llama", name="base")
    with pytest.raises(FileNotFoundError, match="nope.jinja"):
        install_chat_template(tokenizer, str(tmp_path / "nope.jinja"), name="base")
    (tmp_path / "latin1.jinja").write_bytes(b"{{ '\xe9' }}")
    with pytest.raises(ValueError, match="not UTF-8"):
        install_chat_template(tokenizer, str(tmp_path / "latin1.jinja"), name="base")


def test_config_checks_the_spec_and_refuses_an_unmerged_adapter():
    base = dict(model="tiny-random", data="d.jsonl")
    assert build_config(SFTConfig, None, {**base, "chat_template": "chatml"}).chat_template == "chatml"
    with pytest.raises(ConfigError, match=r"chat_template='llama' is not one of chatml"):
        build_config(SFTConfig, None, {**base, "chat_template": "llama"})
    with pytest.raises(ConfigError, match="needs merge_lora"):
        build_config(SFTConfig, None, {**base, "chat_template": "chatml", "lora_r": 4, "merge_lora": False})


def test_without_a_spec_the_loader_is_load_tokenizer(tiny_path):
    tokenizer, change = load_tokenizer_with_template(str(tiny_path), "")
    assert change is None and tokenizer.chat_template == TINY_CHAT_TEMPLATE


def test_chat_template_command_writes_a_folder_every_command_loads(base_path, tmp_path, capsys):
    out = tmp_path / "chat"
    assert main(["chat-template", "--model", str(base_path), "--template", "chatml", "--output", str(out)]) == 0
    assert "added tokens <|im_start|>, <|im_end|>" in capsys.readouterr().out
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 101
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 100
    assert model.generation_config.pad_token_id == 100
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|im_end|>"
    # A second run into the same folder, and a bad template, stop with one line and write nothing.
    assert main(["chat-template", "--model", str(base_path), "--template", "chatml", "--output", str(out)]) == 2
    assert "is a folder that holds files; expected a new or empty folder" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert main(["chat-template", "--model", str(base_path), "--template", "x.txt", "--output", str(bad)]) == 2
    assert not bad.exists() and not (tmp_path / "bad.tmp").exists()


def test_chat_template_refuses_a_missing_parent_folder_and_an_existing_file(base_path, tmp_path, monkeypatch,
                                                                           capsys):
    """Fresh-user findings: `--output nodir/sub/ct5` made the missing folders, and `--output
    A.jsonl` (an existing file) was called "not an empty folder"."""
    monkeypatch.chdir(tmp_path)
    assert main(["chat-template", "--model", str(base_path), "--template", "chatml", "--output", "nodir/sub/ct5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--output 'nodir/sub/ct5': folder 'nodir/sub' does not exist") and len(err.splitlines()) == 1
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "A.jsonl").write_text("{}\n")
    assert main(["chat-template", "--model", str(base_path), "--template", "chatml", "--output", "A.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--output 'A.jsonl' is an existing file; expected a new or empty folder")
    assert (tmp_path / "A.jsonl").read_text() == "{}\n"
