"""KL(A‖BASE) from A's samples against the exact KL, enumerated over every response of a tiny
model with a five-token vocabulary and at most three response tokens."""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.eval.kl import sequence_logprobs
from posttrain.eval.metrics import kl_estimate
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_model
from posttrain.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
"""Response tokens at most: a response ends at EOS or is cut after STEPS tokens."""


def five_token_tokenizer() -> PreTrainedTokenizerFast:
    """unk, im_start, im_end (EOS and pad), "a", "b": every other character of the chat template
    reads as unk, which is still a prompt the model conditions on."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "a", "b"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def scaled_model(tokenizer, seed: int, scale: float):
    """A tiny Llama over the five tokens with its embeddings (tied to the LM head) times `scale`:
    the logits scale with them, so a larger scale means sharper next-token distributions. A
    fresh random model's are nearly uniform and two seeds' KL is near 0, too easy to hit."""
    model = build_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    return model.eval()


def every_response(vocab: int, eos: int) -> list[tuple[int, ...]]:
    """Every response the sampler can produce: tokens up to and including the first EOS, or
    STEPS tokens without one. 1 + 4 + 4·4·5 = 85 of them for 5 tokens; their probabilities
    under any model sum to 1."""
    out = []
    for length in range(1, STEPS + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            ends_at_eos = tokens[-1] == eos
            if eos in tokens[:-1] or (length < STEPS and not ends_at_eos):
                continue
            out.append(tokens)
    return out


@torch.no_grad()
def exact_logprob(model, prompt: list[int], response: tuple[int, ...]) -> float:
    """log π(response | prompt) by a plain forward and log-softmax: independent of the code under test."""
    ids = torch.tensor([prompt + list(response)])
    logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)            # [T, V]
    return sum(float(logprobs[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))


def test_monte_carlo_kl_matches_the_enumerated_kl():
    tokenizer = five_token_tokenizer()
    # A is sharper than BASE: KL ≈ 0.9 nats, spread over many responses (the likeliest has p ≈ 0.37).
    policy, base = scaled_model(tokenizer, seed=1, scale=2.0), scaled_model(tokenizer, seed=2, scale=1.0)
    conversation = [{"role": "user", "content": "ab?"}]
    prompt_ids = tokenize_prompt(conversation, tokenizer)
    responses = every_response(len(tokenizer), tokenizer.eos_token_id)
    assert len(responses) == 85

    # Exact: KL = Σ_y π_A(y)·(log π_A(y) − log π_BASE(y)) over all 85 responses.
    log_a = torch.tensor([exact_logprob(policy, prompt_ids, y) for y in responses], dtype=torch.float64)
    log_base = torch.tensor([exact_logprob(base, prompt_ids, y) for y in responses], dtype=torch.float64)
    assert float(log_a.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    exact = float((log_a.exp() * (log_a - log_base)).sum())
    assert exact > 0.5  # a KL worth estimating, not a near-zero one any estimate would hit

    # Monte Carlo: 4000 responses sampled from A at temperature 1, the log-ratio of each summed
    # over its response tokens.
    prompt = TokenizedPrompt(prompt_ids, conversation, {"messages": conversation}, 0)
    gen = Sampler(policy, tokenizer, precision="fp32", batch_size=4000).generate(
        [prompt], SamplingParams(n=4000, max_new_tokens=STEPS, temperature=1.0, seed=0))
    ratios = sequence_logprobs(policy, gen, batch_size=1000) - sequence_logprobs(base, gen, batch_size=1000)
    estimate, standard_error = kl_estimate(ratios.numpy())
    # The standard error of a mean of 4000 draws; within 4 of them fails by chance ~1 in 16 000.
    assert 0 < standard_error < 0.1 * exact
    assert abs(estimate - exact) < 4 * standard_error, (estimate, exact, standard_error)

    # Each sampled sequence's summed log-prob equals the enumerated one for the same tokens.
    index = {y: i for i, y in enumerate(responses)}
    for row in range(5):
        tokens = tuple(gen.response_ids[row][gen.response_mask[row]].tolist())
        assert float(sequence_logprobs(policy, gen.select(torch.tensor([row])))) == pytest.approx(
            float(log_a[index[tokens]]), abs=1e-4)


def test_kl_of_a_model_with_itself_is_exactly_zero(tiny_model_and_tokenizer):
    # log π_A − log π_A is the same forward twice: every ratio is 0.0, so the mean and its
    # standard error are 0 exactly, not merely small.
    model, tokenizer = tiny_model_and_tokenizer
    conversation = [{"role": "user", "content": "hi"}]
    prompt = TokenizedPrompt(tokenize_prompt(conversation, tokenizer), conversation, {"messages": conversation}, 0)
    gen = Sampler(model, tokenizer, precision="fp32").generate(
        [prompt], SamplingParams(n=6, max_new_tokens=5, temperature=1.0, seed=3))
    ratios = sequence_logprobs(model, gen) - sequence_logprobs(model, gen)
    assert kl_estimate(ratios.numpy()) == (0.0, 0.0)


def test_kl_estimate_mean_and_standard_error():
    # ratios 1, 2, 3: mean 2; sample std (ddof 1) = √((1 + 0 + 1)/2) = 1; SE = 1/√3.
    assert kl_estimate([1.0, 2.0, 3.0]) == pytest.approx((2.0, 3 ** -0.5))
    estimate, error = kl_estimate([0.7])
    assert estimate == 0.7 and error == float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        kl_estimate([0.1, float("-inf")])
