"""Win rates, their confidence intervals, the length-controlled win rate and the KL estimate:
pure functions of numpy arrays (scipy for the bootstrap and the fit).

Shapes: P prompts (the unit a bootstrap resamples: answers to one prompt are not independent),
K answers per prompt. Arrays given as [P] are read as [P, 1].

An outcome is one comparison of a model's answer with the baseline's answer to the same prompt
(and the same sample index), from the model's side: 1 a win, 0 a loss, 0.5 a tie.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

LC_SLOPE_PENALTY = 1e-2
"""Ridge penalty (λ/2)·b² on the length slope of the length-controlled fit. Without it a judge
whose verdicts the length difference separates perfectly (it always picks the longer answer)
has no finite maximum-likelihood slope; with 40+ prompts it moves a non-separable fit's slope
by well under 1 %."""


def _prompts_by_samples(values, name: str) -> np.ndarray:
    """values as a float64 [P, K] array; ValueError naming `name` unless it is finite, non-empty,
    one- or two-dimensional."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty [prompts] or [prompts, samples] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: holds a NaN or infinite value")
    return array


def _outcome_array(outcomes) -> np.ndarray:
    array = _prompts_by_samples(outcomes, "outcomes")
    if ((array < 0) | (array > 1)).any():
        bad = array[(array < 0) | (array > 1)][0]
        raise ValueError(f"outcomes: {bad:g} is not in [0, 1] (1 win, 0.5 tie, 0 loss)")
    return array


def outcomes_from_scores(model_scores, baseline_scores) -> np.ndarray:
    """Outcomes (same shape as the inputs) of a pointwise judge: 1 where the model's score is
    higher than the baseline's on the same prompt, 0 where lower, 0.5 where equal."""
    model, baseline = np.asarray(model_scores, dtype=np.float64), np.asarray(baseline_scores, dtype=np.float64)
    if model.shape != baseline.shape:
        raise ValueError(f"outcomes_from_scores: model scores {model.shape} and baseline scores {baseline.shape} "
                         "differ in shape")
    return 0.5 + 0.5 * np.sign(model - baseline)


def win_rate(outcomes) -> float:
    """The model's win rate over the baseline, ties counted half: the mean outcome [P, K] or [P]."""
    return float(_outcome_array(outcomes).mean())


def bootstrap_interval(outcomes, *, confidence: float = 0.95, n_resamples: int = 9999,
                       seed: int = 0) -> tuple[float, float]:
    """(low, high): a percentile-bootstrap confidence interval of `win_rate(outcomes)`.

    Prompts are resampled (each prompt's mean outcome over its K answers is one observation), so
    the K answers to one prompt move together. Percentile rather than BCa: it is defined for any
    data that is not constant, where BCa's bias correction becomes infinite when nearly every
    resample repeats the observed value, and at 40 prompts the two agree to about 0.01.
    When every prompt has the same outcome, no resample differs and the interval is that value
    alone (the bootstrap cannot show uncertainty it never sees). ValueError for under 2 prompts.
    """
    per_prompt = _outcome_array(outcomes).mean(axis=1)
    _check_interval_options(len(per_prompt), confidence, n_resamples)
    if np.ptp(per_prompt) == 0:
        return float(per_prompt[0]), float(per_prompt[0])
    # random_state, not rng: the keyword every scipy ≥ 1.11 (pyproject's floor) accepts.
    result = stats.bootstrap((per_prompt,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _check_interval_options(n_prompts: int, confidence: float, n_resamples: int) -> None:
    if n_prompts < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 prompts, got {n_prompts}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a level in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: expected at least 1")


def length_controlled_win_rate(outcomes, length_diff, *, slope_penalty: float = LC_SLOPE_PENALTY) -> float:
    """The win rate the judge would give if the two answers were equally long, as AlpacaEval 2
    computes it (Dubois et al. 2024, "Length-Controlled AlpacaEval", §3, Eq. 2 without the
    instruction-difficulty term, which needs many models' verdicts on the same prompts).

    outcomes: [P, K] or [P] in [0, 1]; length_diff: same shape, the model's answer length minus
    the baseline's (any unit; AlpacaEval uses characters). A logistic regression of the outcome on
    the normalised length difference,

        P(win | Δ) = σ(a + b·x),   x = tanh(Δ / std(Δ)),

    is fitted by maximum likelihood with the ridge penalty (λ/2)·b² (LC_SLOPE_PENALTY); the
    outcome enters the Bernoulli log-likelihood y·log σ(z) + (1 − y)·log σ(−z) as it is, so a tie
    (y = 0.5) counts as half a win there as in the raw win rate (the intercept's equation
    Σ(σ(z) − y) = 0 makes the mean prediction equal the mean outcome). The length-controlled
    win rate is the prediction at Δ = 0, x = 0: σ(a). tanh bounds each answer's leverage, as in
    AlpacaEval; its std normalisation makes the unit of Δ irrelevant.

    Special cases, derived from the fit: if every outcome is the same value v, then v (length
    cannot explain a verdict that never varies; for v = 0 or 1 the maximum-likelihood a would be
    infinite). If std(Δ) = 0 every x is 0, the model is σ(a) alone, and setting its gradient
    Σ(σ(a) − y) to 0 gives σ(a) = mean(y): the raw win rate, returned exactly.
    """
    y = _outcome_array(outcomes).ravel()
    delta = _prompts_by_samples(length_diff, "length_diff").ravel()
    if delta.shape != y.shape:
        raise ValueError(f"length_diff has {delta.size} values for {y.size} outcomes")
    if not (math.isfinite(slope_penalty) and slope_penalty > 0):
        raise ValueError(f"slope_penalty={slope_penalty}: expected a finite value > 0")
    if np.ptp(y) == 0:
        return float(y[0])
    scale = delta.std()
    if scale == 0:
        return float(y.mean())
    x = np.tanh(delta / scale)
    design = np.stack([np.ones_like(x), x], axis=1)                           # [N, 2]: intercept a, slope b
    penalty = np.array([0.0, slope_penalty])

    # Negative penalised log-likelihood, with z = a + b·x:
    #   L = −Σ [y·log σ(z) + (1 − y)·log σ(−z)] + (λ/2)·b²
    #   ∇L = Σ (σ(z) − y)·[1, x] + [0, λ·b]
    #   ∇²L = Σ σ(z)·σ(−z)·[1, x]ᵀ[1, x] + diag(0, λ)   (positive definite: a strictly convex fit)
    # Minimised divided by N, so one gradient tolerance suits any number of rows.
    n = len(y)

    def loss(theta):
        z = design @ theta
        nll = -(y * special.log_expit(z) + (1 - y) * special.log_expit(-z)).sum()
        return (nll + 0.5 * slope_penalty * theta[1] ** 2) / n

    def gradient(theta):
        return (design.T @ (special.expit(design @ theta) - y) + penalty * theta) / n

    def hessian(theta):
        z = design @ theta
        weights = special.expit(z) * special.expit(-z)
        return ((design * weights[:, None]).T @ design + np.diag(penalty)) / n

    fit = optimize.minimize(loss, np.zeros(2), jac=gradient, hess=hessian, method="trust-exact",
                            options={"gtol": 1e-10})
    # Judged by the gradient, not fit.success: near the optimum trust-exact can stop on float
    # rounding ("bad approximation") a hair above gtol. A gradient of 1e-7 moves σ(a) by < 1e-6.
    if np.abs(gradient(fit.x)).max() > 1e-7:
        raise ValueError(f"length-controlled win rate: the logistic fit did not converge ({fit.message})")
    return float(special.expit(fit.x[0]))


def length_controlled_interval(outcomes, length_diff, *, confidence: float = 0.95, n_resamples: int = 1000,
                               seed: int = 0, slope_penalty: float = LC_SLOPE_PENALTY) -> tuple[float, float]:
    """(low, high): a percentile-bootstrap interval of `length_controlled_win_rate`, resampling
    prompts (rows of both [P, K] arrays together) and refitting each resample. Fewer resamples
    by default than `bootstrap_interval`: each one is a fit (about 1 ms). Constant outcomes give
    that value alone, as there. ValueError for under 2 prompts."""
    y = _outcome_array(outcomes)
    delta = _prompts_by_samples(length_diff, "length_diff")
    if delta.shape != y.shape:
        raise ValueError(f"length_diff has shape {delta.shape}, outcomes {y.shape}")
    _check_interval_options(len(y), confidence, n_resamples)
    if np.ptp(y) == 0:
        return float(y.flat[0]), float(y.flat[0])

    def statistic(rows):
        picked = rows.astype(np.int64)
        return length_controlled_win_rate(y[picked], delta[picked], slope_penalty=slope_penalty)

    result = stats.bootstrap((np.arange(len(y)),), statistic, confidence_level=confidence,
                             n_resamples=n_resamples, method="percentile", vectorized=False,
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def kl_estimate(log_ratios) -> tuple[float, float]:
    """(estimate, standard error) of KL(A‖BASE) from N sequences sampled from A:
    log_ratios [N] = log π_A(y | x) − log π_BASE(y | x), each summed over the response's tokens.

    KL(A‖BASE) = E_{y∼A}[log π_A(y|x) − log π_BASE(y|x)], so the sample mean is unbiased; its
    standard error is the sample standard deviation (ddof 1) / √N. One sequence gives an
    estimate with an infinite standard error. The mean of a few sequences can be negative
    although KL is not: report it with its error, do not clip it.
    """
    ratios = np.asarray(log_ratios, dtype=np.float64).ravel()
    if ratios.size == 0:
        raise ValueError("kl_estimate: no sequences")
    if not np.isfinite(ratios).all():
        raise ValueError("kl_estimate: a log-ratio is NaN or infinite (a token BASE gives probability 0?)")
    if ratios.size == 1:
        return float(ratios[0]), math.inf
    return float(ratios.mean()), float(ratios.std(ddof=1) / math.sqrt(ratios.size))
