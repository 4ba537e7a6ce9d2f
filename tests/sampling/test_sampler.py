"""The sampler: per-prompt reproducibility, stop handling, log-probs, backends, weight sync."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.models.lora import apply_lora
from posttrain.models.value import response_logprobs
from posttrain.sampling import Sampler, SamplingParams, choose_tokens
from posttrain.sampling.sampler import TOP_P_CANDIDATES, nucleus

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hi", "a longer prompt here", "x", "tell me a story", "why", "abc def", "one more", "last one?"]


def prompts_for(tokenizer, texts: list[str], first_index: int = 0) -> list[TokenizedPrompt]:
    out = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        out.append(TokenizedPrompt(tokenize_prompt(messages, tokenizer), messages, {"prompt": text},
                                   first_index + i))
    return out


def per_sequence(gen) -> dict[tuple[int, int], tuple[list[int], str]]:
    """(prompt, sample) -> (response tokens through the stop, finish reason)."""
    out = {}
    for row in range(len(gen.responses)):
        key = (int(gen.prompt_index[row]), int(gen.sample_index[row]))
        out[key] = (gen.response_ids[row][gen.response_mask[row]].tolist(), gen.finish_reasons[row])
    return out


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_a_prompts_samples_do_not_depend_on_batch_size_or_batch_company(tiny_model_and_tokenizer, backend):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = prompts_for(tokenizer, TEXTS)
    params = SamplingParams(n=2, max_new_tokens=16, temperature=1.0, seed=7)
    runs = [per_sequence(Sampler(model, tokenizer, precision="fp32", batch_size=size, backend=backend)
                         .generate(prompts, params)) for size in (1, 3, 8)]
    assert runs[0] == runs[1] == runs[2]
    # Another order and a subset: prompt i keeps its samples (they follow its source index).
    subset = [prompts[5], prompts[2]]
    alone = Sampler(model, tokenizer, precision="fp32", batch_size=4, backend=backend).generate(subset, params)
    for row in range(len(alone.responses)):
        source = subset[int(alone.prompt_index[row])].source_index
        assert per_sequence(alone)[(int(alone.prompt_index[row]), int(alone.sample_index[row]))] == \
            runs[0][(source, int(alone.sample_index[row]))]
    # The two samples of a prompt are different draws, and another seed gives other samples.
    assert any(runs[0][(i, 0)] != runs[0][(i, 1)] for i in range(len(TEXTS)))
    other = per_sequence(Sampler(model, tokenizer, precision="fp32", backend=backend)
                         .generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=8)))
    assert other != runs[0]


def test_n_samples_per_prompt_come_in_prompt_order(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = Sampler(model, tokenizer, precision="fp32", batch_size=5).generate(
        prompts_for(tokenizer, TEXTS[:3]), SamplingParams(n=4, max_new_tokens=6))
    assert gen.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert gen.sample_index.tolist() == [0, 1, 2, 3] * 3
    assert gen.prompts == [t for t in TEXTS[:3] for _ in range(4)]
    assert gen.prompt_mask[:, -1].all() and not gen.prompt_mask[:, 0].all()   # left-padded
    with pytest.raises(ValueError, match="n=0 must be ≥ 1"):
        Sampler(model, tokenizer).generate(prompts_for(tokenizer, ["a"]), SamplingParams(n=0))


def test_finish_reasons_masks_and_stop_strings(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    eos = tokenizer.eos_token_id
    gen = Sampler(model, tokenizer, precision="fp32").generate(
        prompts_for(tokenizer, TEXTS), SamplingParams(n=3, max_new_tokens=20, stop_strings=("e", "o")))
    assert set(gen.finish_reasons) == {"eos", "stop", "length"}
    width = gen.response_ids.shape[1]
    for row, reason in enumerate(gen.finish_reasons):
        mask = gen.response_mask[row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()                       # a prefix of the row
        ids = gen.response_ids[row, :n].tolist()
        text = tokenizer.decode(ids)
        assert not any(s in tokenizer.decode(ids[:-1]) for s in ("e", "o"))  # nothing stopped earlier
        assert eos not in ids[:-1]
        if reason == "eos":
            assert ids[-1] == eos
        elif reason == "stop":
            assert text.endswith(("e", "o")) and ids[-1] != eos
        else:
            assert n == 20 and ids[-1] != eos and not text.endswith(("e", "o"))
        assert (gen.response_ids[row, n:] == tokenizer.pad_token_id).all()
        assert (gen.sample_logprobs[row, n:] == 0).all() and (gen.sample_logprobs[row, :n] < 0).all()
    assert width == 20 and gen.ended.tolist() == [r != "length" for r in gen.finish_reasons]


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.0, 1.0, 0)])
def test_sampler_logprobs_equal_a_teacher_forced_forward(tiny_model_and_tokenizer, temperature, top_p, top_k):
    # log softmax(logits / τ) of each sampled token, before top-p / top-k truncation — what
    # PPO recomputes for log π_old. fp32 on both sides; tolerance 1e-5 (summation order only).
    model, tokenizer = tiny_model_and_tokenizer
    gen = Sampler(model, tokenizer, precision="fp32").generate(
        prompts_for(tokenizer, TEXTS), SamplingParams(n=2, max_new_tokens=16, temperature=temperature,
                                                     top_p=top_p, top_k=top_k))
    with torch.no_grad():
        forced, _, _ = response_logprobs(model, *gen.sequences(), gen.response_mask,
                                         temperature=temperature or 1.0, with_entropy=False)
    torch.testing.assert_close(gen.sample_logprobs, forced, atol=1e-5, rtol=1e-5)


def test_greedy_equals_transformers_generate(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = prompts_for(tokenizer, TEXTS[:4])
    gen = Sampler(model, tokenizer, precision="fp32", batch_size=4).generate(
        prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for row, prompt in enumerate(prompts):
        out = model.generate(torch.tensor([prompt.input_ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(prompt.input_ids):].tolist()
        assert gen.response_ids[row][gen.response_mask[row]].tolist() == expected


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    # p = (0.5, 0.25, 0.25): token 0 on [0, 0.5), 1 on [0.5, 0.75), 2 on [0.75, 1).
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(5, 3).contiguous()
    u = torch.tensor([0.0, 0.49, 0.5, 0.74, 0.99], dtype=torch.float64)
    tokens, logprobs = choose_tokens(logits, u, SamplingParams(temperature=1.0))
    assert tokens.tolist() == [0, 0, 1, 1, 2]
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25])))
    # top_k=1 and a tiny top_p both leave the most likely token only; greedy takes it too.
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.1), SamplingParams(temperature=0)):
        assert choose_tokens(logits, u, params)[0].tolist() == [0] * 5
    # top_p = 0.6 keeps tokens 0 and 1 (mass before token 1 is 0.5 < 0.6): renormalised 2/3, 1/3.
    u = torch.tensor([0.6, 0.66, 0.67, 0.9, 0.99], dtype=torch.float64)
    assert choose_tokens(logits, u, SamplingParams(top_p=0.6))[0].tolist() == [0, 0, 1, 1, 1]


def test_the_nucleus_from_candidates_is_the_nucleus_of_a_full_sort():
    # Peaked rows keep their nucleus inside the TOP_P_CANDIDATES most likely tokens; flat rows
    # (every third) reach past them and are sorted whole. Both must match a plain full sort.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5000, generator=generator) * 2
    logits[:, :5] += 10
    logits[::3] *= 0.01
    probs = (logits - logits.amax(-1, keepdim=True)).exp()
    mass = probs.sum(-1, keepdim=True)
    for top_p in (0.3, 0.9, 0.99):
        values, order = probs.sort(dim=-1, descending=True)
        before = values.cumsum(-1) - values
        expected = torch.zeros_like(probs).scatter(-1, order, torch.where(before < top_p * mass, values, 0.0))
        kept = nucleus(probs, top_p * mass)
        assert torch.equal(kept, expected)
        kept_counts = (kept > 0).sum(-1)
        assert kept_counts[::3].min() > TOP_P_CANDIDATES            # the flat rows did reach past
        if top_p <= 0.9:                                            # and the peaked ones did not
            assert kept_counts[1::3].max() <= TOP_P_CANDIDATES and kept_counts[2::3].max() <= TOP_P_CANDIDATES


def test_evenly_spaced_uniforms_reproduce_the_distribution_at_temperature():
    # softmax(log p / τ) with p = (0.6, 0.3, 0.1) and τ = 0.5 is p² / Σp² = (36, 9, 1) / 46; with
    # 4600 evenly spaced u every token is drawn exactly 46·(36, 9, 1) = (3600, 900, 100) times.
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(4600, 3).contiguous()
    u = (torch.arange(4600, dtype=torch.float64) + 0.5) / 4600
    tokens, logprobs = choose_tokens(logits, u, SamplingParams(temperature=0.5))
    assert torch.bincount(tokens, minlength=3).tolist() == [3600, 900, 100]
    assert logprobs[0].item() == pytest.approx(math.log(36 / 46), abs=1e-6)


@pytest.mark.needs_bf16
def test_bf16_copy_follows_the_weights_after_an_optimizer_step(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    sampler = Sampler(model, tokenizer, precision="bf16", backend="llama")
    ids = torch.tensor([prompts_for(tokenizer, ["hello"])[0].input_ids])
    positions, key_mask = torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool)

    def logits(s: Sampler) -> torch.Tensor:
        s.decoder.start(1, ids.shape[1])
        return s.decoder.forward(ids, positions, 0, key_mask)

    before = logits(sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    fresh = logits(Sampler(model, tokenizer, precision="bf16", backend="llama"))
    assert torch.equal(logits(sampler), before)                 # a stale copy until synced
    assert (fresh - before).abs().max() > 1e-2
    sampler.sync()
    assert torch.equal(logits(sampler), fresh)
    # and the synced bf16 copy computes what the fp32 model computes, to bf16 rounding.
    with torch.no_grad():
        reference = model(ids).logits[:, -1]
    torch.testing.assert_close(fresh, reference, atol=0.1, rtol=0.05)


def test_lora_adapters_are_merged_into_the_inference_copy(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    prompts, params = prompts_for(tokenizer, TEXTS[:4]), SamplingParams(n=2, max_new_tokens=12)
    fast = Sampler(lora, tokenizer, precision="fp32", backend="llama").generate(prompts, params)
    plain = Sampler(lora, tokenizer, precision="fp32", backend="hf").generate(prompts, params)
    assert per_sequence(fast) == per_sequence(plain)
    torch.testing.assert_close(fast.sample_logprobs, plain.sample_logprobs, atol=1e-5, rtol=1e-5)


def test_an_untied_head_is_read_from_its_own_weight(tiny_model_and_tokenizer):
    # The inference copy packs a tied head from the embedding's copy; an untied one must not be.
    model, tokenizer = tiny_model_and_tokenizer
    config = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    untied = type(model)(config).eval()
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    prompts, params = prompts_for(tokenizer, TEXTS[:4]), SamplingParams(n=2, max_new_tokens=12)
    fast = Sampler(untied, tokenizer, precision="fp32", backend="llama").generate(prompts, params)
    plain = Sampler(untied, tokenizer, precision="fp32", backend="hf").generate(prompts, params)
    assert per_sequence(fast) == per_sequence(plain)
    torch.testing.assert_close(fast.sample_logprobs, plain.sample_logprobs, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_one_line_errors(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = prompts_for(tokenizer, ["a"])
    for params, message in ((SamplingParams(max_new_tokens=0), "max_new_tokens=0"),
                            (SamplingParams(temperature=-1), "temperature=-1"),
                            (SamplingParams(top_p=0), "top_p=0"), (SamplingParams(top_k=-2), "top_k=-2"),
                            (SamplingParams(stop_strings=("",)), "stop_strings")):
        with pytest.raises(ValueError, match=message):
            Sampler(model, tokenizer).generate(prompts, params)
    with pytest.raises(ValueError, match="batch_size=0"):
        Sampler(model, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="backend 'vllm'"):
        Sampler(model, tokenizer, backend="vllm")
    with pytest.raises(ValueError, match="no prompts"):
        Sampler(model, tokenizer).generate([], SamplingParams())


@pytest.mark.embedded
def test_smollm2_fast_decoder_matches_a_teacher_forced_forward(smollm2_path):
    from posttrain.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(str(smollm2_path)), load_causal_lm(str(smollm2_path)).eval()
    gen = Sampler(model, tokenizer, precision="fp32", batch_size=4).generate(
        prompts_for(tokenizer, ["Why is the sky blue?", "List three fruits."]), SamplingParams(n=2, max_new_tokens=12))
    with torch.no_grad():
        forced, _, _ = response_logprobs(model, *gen.sequences(), gen.response_mask, temperature=1.0,
                                         with_entropy=False)
    # fp32 throughout; differences come from summation order across 30 layers (measured ≈ 2e-5).
    torch.testing.assert_close(gen.sample_logprobs, forced, atol=2e-4, rtol=1e-4)
