"""One reading of every reply: the reward model's head at the reply's last token — its EOS when
the policy wrote one, else its own last token (cut off at max_new_tokens, or a stop string) —
whether the rollout's ids are scored or the text is rendered again with the reward model's
template, and whether that template is the policy's or another one."""

from __future__ import annotations

import pytest
import torch
from scoring_helpers import generation

from posttrain.data import TokenizedPrompt, tokenize_prompt
from posttrain.models.reward import RewardModel
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from posttrain.sampling import Sampler, SamplingParams
from posttrain.scoring import RewardModelScorer, same_tokenization, score_generation

# The example first: a reply cut off at max_new_tokens. Then one ended by the policy's
# EOS, and one ended by the stop string ";" (no EOS either).
ROWS = [("List three fruits.", "Apple, banana, and", "length"),
        ("Say hi", "hi there", "eos"),
        ("Count to three", "1, 2, 3;", "stop")]

# Same vocabulary, another chat template: "role:" headers instead of "role\n".
OTHER_TEMPLATE = TINY_CHAT_TEMPLATE.replace("message['role'] + '\n'", "message['role'] + ':\n'").replace(
    "'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'")


def head_at_last_token(rm: RewardModel, text: str) -> float:
    """The head on the last-layer hidden state of the last token of `text`, encoded on its
    own (character-level tokenizer: one token per character, special tokens whole)."""
    ids = torch.tensor([rm.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        hidden = rm.backbone(input_ids=ids).last_hidden_state
        return rm.head(hidden[0, -1]).item()


def expected(rm: RewardModel, header: str) -> list[float]:
    """Hand-rendered prompt + reply, with <|im_end|> only where the policy wrote an EOS."""
    return [head_at_last_token(rm, f"<|im_start|>user{header}{prompt}<|im_end|>\n<|im_start|>assistant{header}"
                                   f"{reply}" + ("<|im_end|>" if why == "eos" else ""))
            for prompt, reply, why in ROWS]


@pytest.fixture
def rm(tiny_path) -> RewardModel:
    return RewardModel.from_causal_lm(str(tiny_path), seed=1).eval()


def test_cut_off_reply_is_encoded_without_the_end_of_turn_token(rm):
    text = rm.tokenizer.decode(rm.encode("List three fruits.", "Apple, banana, and", finished=False))
    assert text == "<|im_start|>user\nList three fruits.<|im_end|>\n<|im_start|>assistant\nApple, banana, and"
    finished = rm.encode("List three fruits.", "Apple, banana, and")
    assert rm.encode("List three fruits.", "Apple, banana, and", finished=False) == finished[:-1]
    assert finished[-1] == rm.tokenizer.eos_token_id
    # Truncated: the finished reply cut to max_length + 1 tokens, less its last one.
    cut = rm.encode("List three fruits.", "Apple, banana, and", finished=False, max_length=40)
    assert len(cut) == 40 and cut == rm.encode("List three fruits.", "Apple, banana, and", max_length=41)[:-1]


def test_ids_and_text_paths_read_the_head_at_the_same_token(rm):
    policy_tokenizer = build_tiny_tokenizer()
    scorer = RewardModelScorer(rm, "rm:tiny", batch_size=2)
    gen = generation(policy_tokenizer, ROWS)
    assert same_tokenization(rm.tokenizer, policy_tokenizer)
    want = expected(rm, "\n")
    from_ids = score_generation(scorer, gen, [[{"role": "user", "content": p}] for p, _, _ in ROWS], [{}] * 3,
                                tokenizer=policy_tokenizer)
    from_text = scorer.score([p for p, _, _ in ROWS], [r for _, r, _ in ROWS], finished=[False, True, False])
    assert from_ids.tolist() == pytest.approx(want, abs=1e-5)
    assert from_text == pytest.approx(want, abs=1e-5)
    # The reading the issue reported: the cut-off reply scored as if it had finished.
    as_if_finished = head_at_last_token(rm, "<|im_start|>user\nList three fruits.<|im_end|>\n"
                                            "<|im_start|>assistant\nApple, banana, and<|im_end|>")
    assert abs(as_if_finished - want[0]) > 1e-3


def test_a_reward_model_with_another_template_reads_its_own_rendering_at_the_same_token(rm):
    other = build_tiny_tokenizer()
    other.chat_template = OTHER_TEMPLATE
    rm_other = RewardModel(rm.model, other).eval()
    policy_tokenizer = build_tiny_tokenizer()
    assert not same_tokenization(rm_other.tokenizer, policy_tokenizer)
    gen = generation(policy_tokenizer, ROWS)
    scores = score_generation(RewardModelScorer(rm_other, "rm:other"), gen,
                              [[{"role": "user", "content": p}] for p, _, _ in ROWS], [{}] * 3,
                              tokenizer=policy_tokenizer)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.tolist() == pytest.approx(expected(rm_other, ":\n"), abs=1e-5)


def test_sampled_rollouts_score_the_same_on_ids_and_on_text(rm, tiny_model_and_tokenizer):
    # The sampler's own Generation: replies cut at 6 tokens, stopped at "a", or ended by EOS.
    model, tokenizer = tiny_model_and_tokenizer
    texts = [f"prompt {i}" for i in range(6)]
    prompts = [TokenizedPrompt(tokenize_prompt([{"role": "user", "content": t}], tokenizer),
                               [{"role": "user", "content": t}], {"prompt": t}, i) for i, t in enumerate(texts)]
    gen = Sampler(model, tokenizer, precision="fp32", batch_size=12).generate(
        prompts, SamplingParams(n=2, max_new_tokens=6, stop_strings=("a",), seed=2))
    assert set(gen.finish_reasons) == {"eos", "stop", "length"}
    scorer = RewardModelScorer(rm, "rm:tiny", batch_size=5)
    from_ids = score_generation(scorer, gen, [p.messages for p in prompts], [p.record for p in prompts],
                                tokenizer=tokenizer)
    index = gen.prompt_index.tolist()
    from_text = scorer.score([prompts[i].messages for i in index], gen.responses,
                             finished=[why == "eos" for why in gen.finish_reasons])
    # Rows whose only special token is a final EOS: others (<unk>, <|im_start|>) do not survive decoding.
    special = (gen.response_ids <= tokenizer.eos_token_id) & gen.response_mask
    comparable = special.sum(-1) == torch.tensor([why == "eos" for why in gen.finish_reasons]).long()
    assert comparable.sum() >= 8
    torch.testing.assert_close(from_ids[comparable], torch.tensor(from_text)[comparable], atol=1e-5, rtol=1e-5)
