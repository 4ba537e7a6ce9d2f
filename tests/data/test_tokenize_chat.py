"""Loss masks through real chat templates: decode exactly the tokens that carry loss."""

from __future__ import annotations

import pytest

from posttrain.data import PreferencePair, tokenize_conversation, tokenize_pair, tokenize_prompt
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

ONE_TURN = [U("Capital of France?"), A("Paris.")]
TWO_TURNS = [U("Capital of France?"), A("Paris."), U("And of Italy?"), A("Rome.")]


def loss_spans(example, tokenizer) -> list[str]:
    """Decoded runs of consecutive loss tokens."""
    spans, run = [], []
    for token, counts in zip(example.input_ids + [None], example.loss_mask + [False]):
        if counts:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def check_template(tokenizer):
    one = tokenize_conversation(ONE_TURN, tokenizer)
    assert loss_spans(one, tokenizer) == ["Paris.<|im_end|>"]
    two = tokenize_conversation(TWO_TURNS, tokenizer)
    assert loss_spans(two, tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # The ids are the whole templated conversation, trailing "\n" included (outside the loss).
    assert tokenizer.decode(two.input_ids) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tokenizer.decode(two.input_ids[-1:]) == "\n" and not two.loss_mask[-1]
    everything = tokenize_conversation(TWO_TURNS, tokenizer, train_on_prompt=True)
    assert everything.input_ids == two.input_ids
    assert everything.loss_mask == [False] + [True] * (len(two.input_ids) - 1)


def test_tiny_template_loss_tokens(tiny_tokenizer):
    check_template(tiny_tokenizer)
    with_system = tokenize_conversation([S("Be brief."), *TWO_TURNS], tiny_tokenizer)
    assert loss_spans(with_system, tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


@pytest.mark.embedded
def test_smollm2_template_loss_tokens(smollm2_tokenizer):
    check_template(smollm2_tokenizer)
    # SmolLM2 injects its default system prompt: prompt tokens, never loss tokens.
    text = smollm2_tokenizer.decode(tokenize_conversation(ONE_TURN, smollm2_tokenizer).input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.embedded
def test_smollm2_reply_ids_are_what_generation_sees(smollm2_tokenizer):
    # Encoded as one text, the header's "\n" and a reply starting "\n\n" tokenize differently
    # than apart; training ids must start with the prompt ids generation is given.
    messages = [U("Q"), A("\n\nAnswer.")]
    example = tokenize_conversation(messages, smollm2_tokenizer)
    prompt = tokenize_prompt(messages[:1], smollm2_tokenizer)
    assert example.input_ids[: len(prompt)] == prompt
    assert loss_spans(example, smollm2_tokenizer) == ["\n\nAnswer.<|im_end|>"]
    whole = smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    assert smollm2_tokenizer(whole, add_special_tokens=False)["input_ids"] != example.input_ids


def test_tokenize_prompt_ends_with_generation_prompt(tiny_tokenizer):
    ids = tokenize_prompt([U("Hi")], tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = build_tiny_tokenizer()
    # Like templates that strip reasoning from past assistant turns: earlier turns render
    # differently once a later message follows, so turn-by-turn masking cannot be trusted.
    tokenizer.chat_template = TINY_CHAT_TEMPLATE.replace(
        "message['content']", "(message['content'] if loop.last or message['role'] != 'assistant' else '...')"
    )
    with pytest.raises(ValueError, match="chat template renders the first 2 messages differently"):
        tokenize_conversation(TWO_TURNS, tokenizer)


def test_template_without_eos_after_reply_is_refused():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="does not end the assistant turn with the EOS token '<\\|im_end\\|>'"):
        tokenize_conversation(ONE_TURN, tokenizer)


def test_pair_ids(tiny_tokenizer):
    pair = PreferencePair([U("Q?")], [A("Yes.")], [A("No!!")], 1.0, 3)
    tokenized = tokenize_pair(pair, tiny_tokenizer)
    decode = tiny_tokenizer.decode
    assert decode(tokenized.prompt_ids) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert (decode(tokenized.chosen_ids), decode(tokenized.rejected_ids)) == ("Yes.<|im_end|>", "No!!<|im_end|>")
    assert (tokenized.margin, tokenized.source_index) == (1.0, 3)
    chosen, rejected = tokenized.examples()
    assert chosen.input_ids == tokenized.prompt_ids + tokenized.chosen_ids
    assert decode([t for t, m in zip(rejected.input_ids, rejected.loss_mask) if m]) == "No!!<|im_end|>"


def test_pair_truncation_policy(tiny_tokenizer):
    # Character-level: prompt = "<|im_start|>" + "user\n" + 20 chars + "<|im_end|>" + "\n"
    # + "<|im_start|>" + "assistant\n" = 1 + 5 + 20 + 1 + 1 + 1 + 10 = 39 tokens;
    # chosen = 30 chars + <|im_end|> = 31 tokens, rejected 6 + 1 = 7.
    pair = PreferencePair([U("q" * 20)], [A("c" * 30)], [A("r" * 6)], None, 0)
    full = tokenize_pair(pair, tiny_tokenizer)
    assert (len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids), full.length) == (39, 31, 7, 70)
    # max_length 64: the prompt gives up 70 - 64 = 6 tokens from the left (keeping 33 >= 64 // 2),
    # the replies stay whole.
    cut = tokenize_pair(pair, tiny_tokenizer, max_length=64)
    assert cut.prompt_ids == full.prompt_ids[6:] and cut.chosen_ids == full.chosen_ids
    # max_length 40: the prompt keeps max_length // 2 = 20 tokens (its end), replies get the other 20.
    cut = tokenize_pair(pair, tiny_tokenizer, max_length=40)
    assert cut.prompt_ids == full.prompt_ids[-20:]
    assert cut.chosen_ids == full.chosen_ids[:20] and cut.rejected_ids == full.rejected_ids
