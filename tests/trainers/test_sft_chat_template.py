"""Instruction-tuning a base model that has no chat template: `posttrain sft --chat-template`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.chat_template import CHATML_TEMPLATE
from posttrain.models.tiny import build_tiny_base_tokenizer, build_tiny_model
from posttrain.sampling import SamplingParams, chat_generation

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = {"hi": "hello there", "name?": "posttrain", "sky?": "blue", "2+2?": "four"}
"""A fixed reply to each of four prompts: the random base model writes none of them."""


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    """The tiny Llama as a base model: no chat template, no ChatML tokens, EOS <|endoftext|>, no pad."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = build_tiny_base_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def task_data(tmp_path) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TASK.items()))
    return path


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--precision", "fp32", "--warmup-ratio", "0", "--lr-scheduler", "constant", *extra]


def greedy(folder: Path):
    return chat_generation(load_causal_lm(str(folder)), load_tokenizer(str(folder)), list(TASK),
                           SamplingParams(temperature=0, max_new_tokens=20))


def test_sft_with_chatml_teaches_a_base_model_and_its_folder_generates_in_chatml(base_path, task_data, tmp_path,
                                                                                capsys):
    # 60 steps over the four records (≈1 s): the loss must fall from its random-model start
    # (≈ log 101 ≈ 4.6 per token) to near 0, and greedy replies must be the taught ones,
    # each ended by <|im_end|>, the new EOS.
    out = tmp_path / "sft"
    assert main(sft_args(base_path, task_data, out, "--chat-template", "chatml", "--max-steps", "60",
                         "--lr", "3e-3")) == 0
    assert "chat template chatml: added tokens <|im_start|>, <|im_end|>" in capsys.readouterr().out
    losses = [json.loads(line)["loss/train"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0]

    tokenizer = load_tokenizer(str(out))  # no "has no chat_template" any more
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    gen = greedy(out)
    assert gen.responses == list(TASK.values()) and gen.finish_reasons == ["eos"] * len(TASK)
    # The prompt was rendered with the new template: <|im_start|> (99) and <|im_end|> (100) in it.
    prompt = gen.prompt_ids[0][gen.prompt_mask[0]].tolist()
    assert prompt[0] == 99 and prompt.count(100) == 1 and prompt[-len("assistant\n") - 1] == 99

    assert main(["generate", "--model", str(out), "--prompt", "sky?", "--prompt", "hi"]) == 0
    assert capsys.readouterr().out == "### sky?\nblue\n\n### hi\nhello there\n\n"


def test_without_the_flag_or_with_a_bad_template_sft_stops_before_writing(base_path, task_data, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(sft_args(base_path, task_data, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "has no chat_template" in err and "posttrain sft --chat-template chatml|FILE.jinja|from:MODEL" in err
    assert not out.exists()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }<|end|>\n{% endfor %}\n")
    assert main(sft_args(base_path, task_data, out, "--chat-template", str(bad), "--max-steps", "1")) == 2
    assert f"{bad}: line 2: Jinja syntax error" in capsys.readouterr().err
    assert not out.exists()


def test_lora_trains_the_new_token_rows_and_merges_them(base_path, task_data, tmp_path):
    # Frozen, the two new rows would stay equal (both the mean); LoRA must train them too.
    out = tmp_path / "lora"
    assert main(sft_args(base_path, task_data, out, "--chat-template", "chatml", "--max-steps", "5",
                         "--lr", "1e-2", "--lora-r", "4")) == 0
    start = load_file(str(base_path / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert after.shape == (101, 64)
    torch.testing.assert_close(after[:99], start, rtol=0, atol=0)  # old rows: frozen
    mean = start.mean(dim=0)
    assert (after[99] - mean).abs().max() > 1e-3 and (after[100] - mean).abs().max() > 1e-3
    assert (after[99] - after[100]).abs().max() > 1e-3


def test_other_trainers_refuse_a_base_model_and_take_a_chat_template_copy(base_path, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": "no"}) + "\n"
                             for p, c in TASK.items()))
    dpo = ["dpo", "--data", str(pairs), "--max-steps", "1", "--batch-size", "2", "--precision", "fp32"]
    assert main([*dpo, "--model", str(base_path), "--output-dir", str(tmp_path / "refused")]) == 2
    assert "posttrain chat-template --model" in capsys.readouterr().err
    chat = tmp_path / "chat"
    assert main(["chat-template", "--model", str(base_path), "--template", "chatml", "--output", str(chat)]) == 0
    assert main([*dpo, "--model", str(chat), "--output-dir", str(tmp_path / "dpo")]) == 0
    assert load_tokenizer(str(tmp_path / "dpo")).chat_template == CHATML_TEMPLATE
