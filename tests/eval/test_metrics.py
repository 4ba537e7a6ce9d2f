"""Win rate, its bootstrap interval and the length-controlled win rate on hand-made verdicts,
each number derived in a comment."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import special

from posttrain.eval.metrics import (bootstrap_interval, length_controlled_interval, length_controlled_win_rate,
                                    outcomes_from_scores, win_rate)


def test_win_rate_counts_ties_half():
    # 2 wins + 1 tie + 1 loss over 4 comparisons: (1 + 1 + 0.5 + 0) / 4 = 0.625.
    assert win_rate([1, 1, 0.5, 0]) == 0.625
    # [prompts, samples] is the same mean over every comparison: (1 + 0 + 0.5 + 0.5) / 4.
    assert win_rate([[1, 0], [0.5, 0.5]]) == 0.5


def test_outcomes_from_scores_higher_wins_equal_ties():
    assert outcomes_from_scores([3.0, 1.0, 2.0], [1.0, 1.0, 5.0]).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="differ in shape"):
        outcomes_from_scores([1.0, 2.0], [1.0])


@pytest.mark.parametrize("bad, message", [([1, 2], "not in \\[0, 1\\]"), ([0.5, float("nan")], "NaN"),
                                          ([], "non-empty")])
def test_outcomes_outside_0_1_or_not_finite_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        win_rate(bad)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 24 wins and 16 losses over 40 prompts: p = 0.6, standard error √(0.6·0.4/40) = 0.0775, so
    # the normal 95 % interval is 0.6 ± 1.96·0.0775 = [0.448, 0.752]. The percentile bootstrap
    # of a mean this size agrees to within its 1/40 = 0.025 grid.
    outcomes = [1.0] * 24 + [0.0] * 16
    low, high = bootstrap_interval(outcomes)
    assert low == pytest.approx(0.448, abs=0.03) and high == pytest.approx(0.752, abs=0.03)
    assert low < win_rate(outcomes) < high
    assert bootstrap_interval(outcomes, seed=0) == (low, high)          # seeded: reproducible
    narrower = bootstrap_interval(outcomes, confidence=0.5)             # a lower level, a narrower interval
    assert low < narrower[0] < narrower[1] < high


def test_bootstrap_resamples_prompts_not_answers():
    # 10 prompts, 4 answers each, every answer to a prompt judged alike: resampling prompts
    # sees 10 observations, the same interval as one answer per prompt.
    per_prompt = np.array([1.0] * 6 + [0.0] * 4)
    clustered = np.repeat(per_prompt[:, None], 4, axis=1)               # [10, 4]
    assert bootstrap_interval(clustered) == bootstrap_interval(per_prompt)
    # Treating the 40 answers as independent would claim about √4 = 2 times less uncertainty.
    width = np.diff(bootstrap_interval(clustered))[0]
    naive = np.diff(bootstrap_interval(clustered.ravel()))[0]
    assert width == pytest.approx(2 * naive, rel=0.25)


@pytest.mark.parametrize("value", [1.0, 0.5, 0.0])
def test_bootstrap_of_identical_outcomes_is_the_value_itself_without_warnings(value):
    # Every prompt the same outcome: every resample has mean `value`; scipy's BCa would return
    # NaN with a warning here, the percentile interval is [value, value], returned directly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_interval([value] * 12) == (value, value)
        assert length_controlled_interval([value] * 12, np.arange(12.0)) == (value, value)


def test_bootstrap_needs_two_prompts():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        bootstrap_interval([1.0])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        bootstrap_interval([[1.0, 0.0, 0.5]])                           # one prompt, three answers


def test_length_control_with_equal_lengths_is_the_raw_win_rate():
    # Δ = 0 everywhere: x = 0, the model is σ(a), and its gradient Σ(σ(a) − y) = 0 gives
    # σ(a) = mean(y). Exactly the raw win rate, ties included.
    outcomes = [1, 1, 0.5, 0, 1, 0, 0.5, 1]
    assert length_controlled_win_rate(outcomes, [0.0] * 8) == win_rate(outcomes) == 0.625
    # Equal but non-zero differences (the model always 7 characters longer) are no information
    # about length either: std(Δ) = 0.
    assert length_controlled_win_rate(outcomes, [7.0] * 8) == 0.625


def test_length_control_of_a_judge_that_only_looks_at_length_is_about_even():
    # A judge with no view on quality: P(model wins) = σ(0 + 3·tanh(Δ/std Δ)), and the model's
    # answers are longer on most prompts (Δ ~ N(40, 60²) characters). The raw win rate is
    # inflated well above 0.5; the fitted intercept is near the true 0, so σ(a) ≈ 0.5. With
    # 2000 verdicts its sampling error is about 0.015.
    rng = np.random.default_rng(0)
    delta = rng.normal(40, 60, 2000)
    outcomes = (rng.random(2000) < special.expit(3 * np.tanh(delta / delta.std()))).astype(float)
    assert win_rate(outcomes) > 0.65
    assert length_controlled_win_rate(outcomes, delta) == pytest.approx(0.5, abs=0.04)


def test_length_control_keeps_a_real_quality_difference():
    # The same length bias plus a real advantage a = 1: the raw rate mixes both (≈ 0.8), the
    # length-controlled rate recovers σ(1) = 0.731.
    rng = np.random.default_rng(1)
    delta = rng.normal(40, 60, 2000)
    outcomes = (rng.random(2000) < special.expit(1 + 3 * np.tanh(delta / delta.std()))).astype(float)
    assert win_rate(outcomes) > 0.78
    assert length_controlled_win_rate(outcomes, delta) == pytest.approx(special.expit(1.0), abs=0.04)


def test_length_control_of_a_judge_that_always_picks_the_longer_answer():
    # The model is 50 characters longer on 30 prompts (all wins) and 50 shorter on 10 (all
    # losses): raw win rate 0.75, and length separates the verdicts perfectly, x = ±c with
    # c = tanh(50 / std Δ) = tanh(50 / 43.3) = 0.82 (mean Δ 25, std √(50² − 25²)). The slope
    # grows until the penalty (λ = 0.01) holds it (b ≈ 7.3, so σ(−bc) ≈ e^{−bc} ≈ 0.003);
    # setting the intercept's gradient to zero,
    #   30·(σ(a + bc) − 1) + 10·σ(a − bc) = 0  ⇒  30·e^{−a−bc} ≈ 10·e^{a−bc}  ⇒  a = ½·log 3,
    # so LC = σ(½·log 3) = 0.634 (the e^{−bc} terms left out move it by ~3e-4): half-way back to
    # 0.5 in log-odds. Where length explains every verdict, no data is left to say how much of
    # the preference is quality, and the estimate splits the difference.
    outcomes = [1.0] * 30 + [0.0] * 10
    delta = [50.0] * 30 + [-50.0] * 10
    assert length_controlled_win_rate(outcomes, delta) == pytest.approx(special.expit(0.5 * math.log(3)), abs=1e-3)


def test_length_control_is_symmetric_between_model_and_baseline():
    # Seen from the baseline's side the outcomes are 1 − y and the differences −Δ; (a, b) →
    # (−a, −b) maps one likelihood onto the other and the penalty b² is unchanged, so
    # LC(1 − y, −Δ) = 1 − LC(y, Δ).
    rng = np.random.default_rng(2)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=(30, 2))
    delta = rng.normal(10, 40, size=(30, 2))
    assert length_controlled_win_rate(1 - outcomes, -delta) == pytest.approx(
        1 - length_controlled_win_rate(outcomes, delta), abs=1e-6)


def test_length_controlled_interval_contains_the_estimate():
    rng = np.random.default_rng(3)
    delta = rng.normal(20, 50, size=(40, 2))
    outcomes = (rng.random((40, 2)) < special.expit(0.5 + np.tanh(delta / delta.std()))).astype(float)
    low, high = length_controlled_interval(outcomes, delta, n_resamples=300)
    assert 0 <= low < length_controlled_win_rate(outcomes, delta) < high <= 1
    with pytest.raises(ValueError, match="shape"):
        length_controlled_interval(outcomes, delta[:, :1])
