"""RewardModel: the score is read at the last real token whatever the padding (pad == eos
included), the saved folder is an ordinary HF sequence-classification model, and scoring
works from text with the reward model's own chat template."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.models.reward import RewardModel

PROMPTS = ["What is 2+2?", "Name a colour.", [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Say hi"}]]
RESPONSES = ["4", "Blue, like the sky on a clear day.", "hi"]


def padded(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def pad_eq_eos_scores(rm: RewardModel, prompts: list, responses: list):
    """Scores of each sequence alone, and of the batch right- and left-padded with EOS."""
    tok = rm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # both built-in models pad with their EOS
    rows = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    # Every sequence ends with the reply's EOS, i.e. with the pad id: "last token != pad"
    # (HF's rule) would read the token before it.
    assert all(r[-1] == tok.eos_token_id for r in rows) and len({len(r) for r in rows}) == len(rows)
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        right = rm(*padded(rows, tok.pad_token_id, "right"))
        left = rm(*padded(rows, tok.pad_token_id, "left"))
    return rows, alone, right, left


def test_left_right_padding_with_pad_eq_eos_give_unpadded_scores(tiny_path):
    rm = RewardModel.from_causal_lm("tiny-random", seed=0).eval()
    rows, alone, right, left = pad_eq_eos_scores(rm, PROMPTS, RESPONSES)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.score(PROMPTS, RESPONSES, batch_size=2), alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        before_eos = torch.cat([rm(torch.tensor([r[:-1]]), torch.ones(1, len(r) - 1, dtype=torch.long))
                                for r in rows])
    assert not torch.allclose(alone, before_eos, atol=1e-3)  # the test would notice an off-by-one


def test_smollm2_pads_with_eos_and_scores_at_the_last_real_token(smollm2_path):
    # SmolLM2's template prepends a ~30-token system prompt: two short pairs keep this quick.
    rm = RewardModel.from_causal_lm("smollm2-135m-instruct", seed=0).eval()
    _, alone, right, left = pad_eq_eos_scores(rm, ["Hi", "What is 2+2?"], ["Hello!", "4"])
    torch.testing.assert_close(right, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=1e-4)


def test_saved_folder_is_an_hf_sequence_classifier_with_the_same_scores(tmp_path, tiny_path):
    rm = RewardModel.from_causal_lm("tiny-random", seed=3).eval()
    out = rm.save_pretrained(tmp_path / "rm")
    weights = load_file(str(out / "model.safetensors"))
    assert weights["score.weight"].shape == (1, 64) and "model.embed_tokens.weight" in weights
    assert not any(k.startswith("lm_head") for k in weights)

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.architectures == ["LlamaForSequenceClassification"] and hf.config.num_labels == 1
    # The saved folder pads with a token other than EOS, so HF's own last-non-pad rule lands
    # on the reply's EOS too.
    assert hf_tok.pad_token_id == hf.config.pad_token_id != hf_tok.eos_token_id
    rows = [rm.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = rm.score(PROMPTS, RESPONSES)
    with torch.no_grad():
        unpadded = torch.cat([hf(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])
        ids, mask = padded(rows, hf_tok.pad_token_id, "right")
        batched = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(unpadded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)

    again = RewardModel.from_pretrained(out)
    torch.testing.assert_close(again.score(PROMPTS, RESPONSES), expected, atol=1e-6, rtol=1e-6)


def test_head_init_is_seeded_and_small(tiny_path):
    a, b, c = (RewardModel.from_causal_lm("tiny-random", seed=s).head.weight for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(1 / 65 ** 0.5, rel=0.3)  # N(0, 1/(H+1)), H = 64


def test_scoring_is_from_text_with_the_reward_models_template(tiny_path):
    rm = RewardModel.from_causal_lm("tiny-random")
    as_text = rm.score(["hello"], ["world"])
    as_messages = rm.score([[{"role": "user", "content": "hello"}]], [[{"role": "assistant", "content": "world"}]])
    torch.testing.assert_close(as_text, as_messages)
    text = rm.tokenizer.decode(rm.encode("hello", "world"))
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>"
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])
