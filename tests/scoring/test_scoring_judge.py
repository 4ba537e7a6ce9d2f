"""The LLM judge: both orders cancel a planted position bias, the tie rule fires when the orders
disagree, pairings pick what they say, labels must be one token, and the real next-token
reading on the tiny model is batched exactly as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from posttrain.data import SampledResponses
from posttrain.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from posttrain.scoring import (DEFAULT_RUBRIC, LLMJudge, NextTokenLabels, Rubric, label_token_ids, load_rubric,
                               select_pairs, verdict)
from posttrain.scoring.files import judge_samples

# A fake judge: the true preference P(x better than y) = 0.5 + (q_x − q_y) / 2, plus a planted
# pull `bias` toward whatever is shown as A. Qualities keep every p(A) inside [0, 1] (no clamping).
QUALITY = {"good": 0.6, "ok": 0.4, "bad": 0.2}


def planted_bias(bias: float):
    def prob_a(prompts, shown_a, shown_b):
        return [0.5 + (QUALITY[a] - QUALITY[b]) / 2 + bias for a, b in zip(shown_a, shown_b)]
    return prob_a


def fake_judge(bias: float, tie_margin: float = 0.5) -> LLMJudge:
    return LLMJudge(planted_bias(bias), "llm:fake", Rubric("default", DEFAULT_RUBRIC), tie_margin)


def test_verdict_arithmetic():
    # p_ab = 0.8 (x shown first), p_ba = 0.3 (y shown first): x wins in both orders.
    # P(x better) = (0.8 + 1 − 0.3) / 2 = 0.75; disagreement |0.8 − 0.7| = 0.1 ≤ 0.5: no tie.
    v = verdict(0.8, 0.3, tie_margin=0.5)
    assert (v.p_first, v.tie, v.position_bias) == (pytest.approx(0.75), False, False)
    # Both orders answer A: (0.9 + 0.1) / 2 = 0.5, disagreement |0.9 − 0.1| = 0.8 > 0.5: a tie.
    v = verdict(0.9, 0.9, tie_margin=0.5)
    assert (v.p_first, v.tie, v.position_bias) == (pytest.approx(0.5), True, True)


def test_both_orders_cancel_a_planted_position_bias():
    judge = fake_judge(bias=0.2)
    # One order alone prefers "ok" to "good": p(A) = 0.5 + (0.4 − 0.6) / 2 + 0.2 = 0.6.
    assert judge.prob_a(["q"], ["ok"], ["good"]) == [pytest.approx(0.6)]
    (v,) = judge.compare(["q"], ["ok"], ["good"])
    # (0.6 + 1 − 0.8) / 2 = 0.4 = 0.5 + (0.4 − 0.6) / 2: the bias is gone, "good" wins.
    assert v.p_first == pytest.approx(0.4) and not v.tie and v.position_bias
    unbiased = fake_judge(bias=0.0).compare(["q"] * 3, ["good", "good", "ok"], ["ok", "bad", "bad"])
    biased = judge.compare(["q"] * 3, ["good", "good", "ok"], ["ok", "bad", "bad"])
    assert [v.p_first for v in biased] == pytest.approx([v.p_first for v in unbiased])
    assert not any(v.position_bias for v in unbiased)


def samples(*responses: list[str]) -> tuple[list[dict], list[SampledResponses]]:
    records = [{"prompt": f"q{i}", "responses": r, "id": i} for i, r in enumerate(responses)]
    return records, [SampledResponses([{"role": "user", "content": f"q{i}"}], list(r), ["eos"] * len(r))
                     for i, r in enumerate(responses)]


def test_pairs_oriented_by_the_debiased_verdict_and_the_summary_counts_bias():
    records, parsed = samples(["ok", "good", "bad"])
    out, summary = judge_samples(records, parsed, fake_judge(bias=0.2), pairing="all")
    assert [(r["chosen"], r["rejected"]) for r in out] == [("good", "ok"), ("ok", "bad"), ("good", "bad")]
    # good vs bad: p(A) 0.9 with good first, exactly 0.5 with bad first: no position picked twice.
    assert (summary.compared, summary.ties, summary.position_biased, summary.written) == (3, 0, 2, 3)
    first = out[0]
    assert first["prompt"] == "q0" and first["id"] == 0 and "responses" not in first
    # good vs ok: p(A) 0.8 with good first, 0.6 with ok first; P(good better) = 0.6.
    assert first["judge"]["p_chosen"] == pytest.approx(0.6)
    assert first["judge"]["p_a_chosen_first"] == pytest.approx(0.8)
    assert first["judge"]["p_a_rejected_first"] == pytest.approx(0.6)
    assert first["judge"]["spec"] == "llm:fake" and first["judge"]["position_bias"] is True


def test_the_tie_rule_fires_when_the_orders_disagree():
    # bias 0.35: good vs ok gives p(A) 0.95 and 0.75, so x's preference is 0.95 in one order and
    # 0.25 in the other, disagreement 0.7 > 0.5: a tie, counted and never written. good vs bad
    # (0.5 + 0.2 + 0.35 = 1.05) would leave [0, 1], so only ok vs good and ok vs bad are judged.
    records, parsed = samples(["ok", "good"], ["ok", "bad"])
    out, summary = judge_samples(records, parsed, fake_judge(bias=0.35), pairing="all")
    # ok vs bad: 0.5 + 0.1 + 0.35 = 0.95 and 0.5 − 0.1 + 0.35 = 0.75: also 0.95 vs 0.25, a tie.
    assert out == [] and (summary.ties, summary.position_biased, summary.written) == (2, 2, 0)
    out, summary = judge_samples(records, parsed, fake_judge(bias=0.35, tie_margin=0.75), pairing="all")
    assert [(r["chosen"], r["rejected"]) for r in out] == [("good", "ok"), ("ok", "bad")] and summary.ties == 0


def test_pairings_and_min_score_gap():
    records, parsed = samples(["ok", "good", "bad"])
    judge = fake_judge(bias=0.1)
    picked = {name: [(r["chosen"], r["rejected"]) for r in judge_samples(records, parsed, judge, pairing=name)[0]]
              for name in ("all", "best_vs_rest", "best_vs_worst")}
    assert picked["best_vs_rest"] == [("good", "ok"), ("good", "bad")]
    assert picked["best_vs_worst"] == [("good", "bad")]
    # P(better) is 0.6 for good/ok and ok/bad, 0.7 for good/bad: a gap of 0.15 keeps good/bad only.
    out, summary = judge_samples(records, parsed, judge, pairing="all", min_score_gap=0.15)
    assert [(r["chosen"], r["rejected"]) for r in out] == [("good", "bad")] and summary.within_gap == 2


def test_identical_responses_are_not_judged_and_never_a_pair():
    records, parsed = samples(["good", "bad", "good"], ["same", "same"])
    out, summary = judge_samples(records, parsed, fake_judge(bias=0.2), pairing="all")
    assert [(r["chosen"], r["rejected"]) for r in out] == [("good", "bad"), ("good", "bad")]
    assert (summary.compared, summary.within_gap) == (2, 2)


def test_a_written_pair_follows_its_own_verdict_even_against_the_ranking():
    # 0 beats 1 (0.9) and 2 (0.9) by far, but loses to 3 (0.4) which loses to everyone else;
    # mean wins: 0 → (0.9 + 0.9 + 0.4) / 3 = 0.733, the best; 3 → (0.6 + 0.3 + 0.3) / 3 = 0.4.
    p = {(0, 1): 0.9, (0, 2): 0.9, (0, 3): 0.4, (1, 2): 0.5, (1, 3): 0.7, (2, 3): 0.7}
    verdicts = {k: verdict(v, 1 - v, tie_margin=0.5) for k, v in p.items()}
    pairs, _ = select_pairs(4, verdicts, pairing="best_vs_rest")
    assert [(c, r) for c, r, _ in pairs] == [(0, 1), (0, 2), (3, 0)]


def test_labels_must_be_single_tokens_right_after_the_generation_prompt(tiny_tokenizer):
    assert label_token_ids(tiny_tokenizer, "llm:tiny") == tuple(tiny_tokenizer.convert_tokens_to_ids(["A", "B"]))
    bracketed = build_tiny_tokenizer()
    bracketed.chat_template = TINY_CHAT_TEMPLATE.replace("message['content']",
                                                         "('[' + message['content'] + ']')")
    with pytest.raises(ValueError, match=r"^llm:bracketed: label 'A' is 3 tokens \['\[', 'A', '\]'\] right after"):
        label_token_ids(bracketed, "llm:bracketed")


def test_rubric_files_need_every_placeholder(tmp_path):
    assert load_rubric(None).text == DEFAULT_RUBRIC
    bad = tmp_path / "r.txt"
    bad.write_text("Which is better, {response_a} or {response_b}? {json: 1}")
    with pytest.raises(ValueError, match=r"rubric .*r.txt: expected the placeholders .* missing \{prompt\}"):
        load_rubric(str(bad))
    good = tmp_path / "g.txt"
    good.write_text("{prompt} | {response_a} | {response_b} {json: 1}")
    assert load_rubric(str(good)).render("p", "a", "b") == "p | a | b {json: 1}"


def test_next_token_probabilities_on_the_tiny_model_are_batch_invariant(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    rubric = Rubric("default", DEFAULT_RUBRIC)
    prob_a = NextTokenLabels(model, tokenizer, rubric, "llm:tiny", batch_size=3)
    prompts = ["Name a fruit.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
               "Why?"]
    shown_a, shown_b = ["apple", "hello there, how are you", "because"], ["pear", "hi", "no reason at all"]
    batched = prob_a(prompts, shown_a, shown_b)
    a, b = tokenizer.convert_tokens_to_ids(["A", "B"])
    for p, x, y, got in zip(prompts, shown_a, shown_b, batched):
        ids = torch.tensor([prob_a.encode(p, x, y)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        assert got == pytest.approx(torch.softmax(logits[[a, b]], -1)[0].item(), abs=1e-5)
    assert len(set(batched)) == 3 and all(0 < p < 1 for p in batched)
