"""`posttrain eval`: answers from each model and from a baseline to the same prompts, judged in
pairs, with win rates and their intervals, a length-controlled win rate, KL(model‖baseline),
answer lengths and EOS rates; every number and every answer goes to eval.json.

Steps: (1) validate every option and load the judge, before any model; (2) sample the
baseline's answers through the one sampler (greedy by default); (3) for each model, sample its
answers and, for the KL estimate, sequences at temperature 1 (the judged answers themselves when
they were sampled at temperature 1 without truncation), scored by both models; (4) judge each
model's k-th answer to a prompt against the baseline's k-th: an `llm:` judge's verdict in both
orders, or the higher `rm:` / `fn:` score (equal: a tie); (5) the metrics of `metrics.py`.
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.data import TokenizedPrompt, load_prompts, tokenize_prompt
from posttrain.eval.format import FORMAT, SHOWCASE_PROMPT, write_text_atomic
from posttrain.eval.kl import sequence_logprobs
from posttrain.eval.metrics import (bootstrap_interval, kl_estimate, length_controlled_interval,
                                    length_controlled_win_rate, outcomes_from_scores, win_rate)
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.precision import resolve_precision
from posttrain.sampling import Generation, Sampler, SamplingParams, concat
from posttrain.scoring import (DEFAULT_TIE_MARGIN, LLMJudge, Scorer, is_pairwise, load_judge, load_scorer, parse_spec,
                               same_tokenization)
from posttrain.scoring.judge import prompt_text

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Comparison:
    """A model against the baseline, over P prompts × K answers."""

    win_rate: float
    """Mean outcome: 1 a win, 0.5 a tie, 0 a loss."""
    win_interval: tuple[float, float]
    """Percentile-bootstrap interval over prompts at the eval's confidence."""
    lc_win_rate: float
    """Length-controlled win rate (AlpacaEval 2), length in characters."""
    lc_interval: tuple[float, float]
    wins: int
    ties: int
    losses: int
    kl: float | None
    """KL(model‖baseline) in nats per answer, or None when not estimated (kl_note says why)."""
    kl_standard_error: float | None
    kl_sequences: int
    """Sequences sampled from the model at temperature 1 that the estimate averages."""
    kl_note: str = ""


@dataclass
class ModelResult:
    """One model's answers (the baseline's too) and, except for the baseline, its comparison."""

    label: str
    model: str
    mean_length_tokens: float
    """Response tokens per answer, its stop token included."""
    mean_length_chars: float
    eos_rate: float
    """Fraction of answers that ended with EOS (not a stop string, not cut at max_new_tokens)."""
    mean_score: float | None
    """Mean rm:/fn: score of its answers; None for an llm: judge."""
    vs_baseline: Comparison | None = None


@dataclass
class EvalResult:
    """Everything `evaluate` measured; `to_dict()` is eval.json."""

    judge: dict
    """spec, kind, used_in_training and, for llm:, rubric and tie margin."""
    baseline: ModelResult
    models: list[ModelResult]
    prompts: int
    n_samples: int
    sampling: dict
    confidence: float
    samples: list[dict]
    """Per prompt: prompt text, every model's answers, finish reasons, lengths, scores, outcomes."""
    showcase: dict | None = None
    """{"prompt", "answers": {label: text}}: every model's answer to SHOWCASE_PROMPT."""
    seconds: dict = field(default_factory=dict)
    """Wall time per step ("sample/LABEL", "judge")."""

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self),
                "intervals": f"{self.confidence:.0%} percentile bootstrap over prompts",
                "length_control": "logistic regression of the outcome on tanh(Δchars / std Δchars), read at Δ = 0"}

    def markdown(self) -> str:
        """A short markdown table of the numbers, after one line naming the judge."""
        return markdown_table(self.to_dict())


def _interval(pair) -> str:
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def markdown_table(result: dict) -> str:
    """The console table of an eval.json dict."""
    judge = result["judge"]
    used = ("TOOK PART in building the training data or rewards: not independent evidence"
            if judge["used_in_training"] else "took no part in training")
    decoding = ("greedy" if result["sampling"]["temperature"] == 0
                else f"temperature {result['sampling']['temperature']:g}")
    lines = [f"judge {judge['spec']} ({used}); {result['prompts']} prompts × {result['n_samples']} "
             f"answer{'s' if result['n_samples'] > 1 else ''}, {decoding}; intervals: {result['intervals']}", "",
             f"| model | win rate vs {result['baseline']['label']} | LC win rate | W / T / L | mean score | "
             f"KL(model‖{result['baseline']['label']}) | length (tokens) | EOS rate |",
             "|---|---|---|---|---|---|---|---|"]
    for row in [*result["models"], result["baseline"]]:
        c = row["vs_baseline"]
        if c is None:
            cells = [f"{row['label']} (baseline)", "—", "—", "—"]
            kl = "—"
        else:
            cells = [row["label"], f"{c['win_rate']:.2f} {_interval(c['win_interval'])}",
                     f"{c['lc_win_rate']:.2f} {_interval(c['lc_interval'])}",
                     f"{c['wins']} / {c['ties']} / {c['losses']}"]
            kl = "—" if c["kl"] is None else f"{c['kl']:.3g} ± {c['kl_standard_error']:.2g}"
        cells += ["—" if row["mean_score"] is None else f"{row['mean_score']:.3g}", kl,
                  f"{row['mean_length_tokens']:.1f}", f"{row['eos_rate']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- sampling


def _generate(sampler: Sampler, prompts: list[TokenizedPrompt], params: SamplingParams, desc: str) -> Generation:
    """params.n answers to every prompt (row i·n + j: prompt i, sample j), a few prompts per call
    behind a progress bar."""
    per_call = max(1, sampler.batch_size // params.n)
    parts = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None, leave=False, file=sys.stderr) as bar:
        for start in range(0, len(prompts), per_call):
            parts.append(sampler.generate(prompts[start: start + per_call], params))
            bar.update(len(parts[-1].responses) // params.n)
    gen = concat(parts, sampler.tokenizer.pad_token_id)
    # Each part counted prompt_index within its own call; make it a position in `prompts`.
    return replace(gen, prompt_index=torch.arange(len(prompts)).repeat_interleave(params.n))


@dataclass
class Answers:
    """One model's answers as [P, K] lists (prompt, sample), and its answer to the showcase prompt."""

    texts: list[list[str]]
    finish_reasons: list[list[str]]
    lengths: list[list[int]]
    """Response tokens, the stop token included."""
    showcase: str | None


def _answers(gen: Generation, k: int, showcase: str | None) -> Answers:
    lengths = gen.response_mask.sum(-1).tolist()
    rows = range(0, len(gen.responses), k)
    return Answers([gen.responses[r: r + k] for r in rows], [gen.finish_reasons[r: r + k] for r in rows],
                   [lengths[r: r + k] for r in rows], showcase)


def _showcase_answer(sampler: Sampler, text: str | None, params: SamplingParams) -> str | None:
    if text is None:
        return None
    conversation = [{"role": "user", "content": text}]
    prompt = TokenizedPrompt(tokenize_prompt(conversation, sampler.tokenizer), conversation,
                             {"messages": conversation}, 0)
    return sampler.generate([prompt], replace(params, n=1)).responses[0].strip()


def _is_plain_sampling(params: SamplingParams) -> bool:
    """Whether answers sampled with params are draws from the model's own distribution (up to
    the stop rules, which the KL of the stopped sequences shares): temperature 1, no truncation."""
    return params.temperature == 1 and params.top_p == 1 and params.top_k == 0


# ---------------------------------------------------------------- judging


def _outcomes_llm(judge: LLMJudge, prompts: list[list[dict]], model: Answers, baseline: Answers):
    """[P, K] outcomes and per-answer verdict records of an llm: judge. Identical answers are not
    judged: a tie, as `posttrain judge` has them."""
    shape = (len(model.texts), len(model.texts[0]))
    outcomes = np.full(shape, 0.5)
    verdicts: list[list[dict | None]] = [[None] * shape[1] for _ in range(shape[0])]
    keys = [(i, k) for i in range(shape[0]) for k in range(shape[1]) if model.texts[i][k] != baseline.texts[i][k]]
    if keys:
        judged = judge.compare([prompts[i] for i, _ in keys], [model.texts[i][k] for i, k in keys],
                               [baseline.texts[i][k] for i, k in keys])
        for (i, k), v in zip(keys, judged):
            outcomes[i, k] = 0.5 if v.tie else float(np.sign(v.p_first - 0.5) * 0.5 + 0.5)
            verdicts[i][k] = {"p_model_better": v.p_first, "tie": v.tie, "position_bias": v.position_bias}
    return outcomes, verdicts


def _scores(scorer, prompts: list[list[dict]], records: list[dict], answers: Answers) -> np.ndarray:
    """[P, K] rm:/fn: scores of one model's answers."""
    rows = [(i, k) for i in range(len(answers.texts)) for k in range(len(answers.texts[0]))]
    scores = scorer.score([prompts[i] for i, _ in rows], [answers.texts[i][k] for i, k in rows],
                          [records[i] for i, _ in rows],
                          finished=[answers.finish_reasons[i][k] == "eos" for i, k in rows])
    return np.asarray(scores, dtype=np.float64).reshape(len(answers.texts), -1)


# ---------------------------------------------------------------- the run


def _check_options(models: Mapping[str, str], baseline_label: str, judge: str, n_samples: int,
                   params: SamplingParams, kl_samples: int, confidence: float, output_dir) -> None:
    if not models:
        raise ValueError("evaluate: no model to evaluate (give at least one --model)")
    for label in [*models, baseline_label]:
        if not label or not label.strip():
            raise ValueError("evaluate: a model label is empty")
    if baseline_label in models:
        raise ValueError(f"evaluate: label {baseline_label!r} names both a model and the baseline; give one "
                         "another label (LABEL=MODEL)")
    parse_spec(judge)
    if n_samples < 1:
        raise ValueError(f"--n-samples={n_samples}: expected at least 1")
    if params.n != 1:
        raise ValueError(f"sampling params n={params.n}: give the number of answers per prompt as n_samples")
    params.validate()
    if n_samples > 1 and params.temperature == 0:
        raise ValueError(f"--n-samples={n_samples} with --temperature 0: greedy decoding gives {n_samples} identical "
                         "answers; set a --temperature > 0 or use --n-samples 1")
    if kl_samples < 0:
        raise ValueError(f"--kl-samples={kl_samples}: expected at least 0")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a level in (0, 1)")
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; expected a folder")


def evaluate(models: Mapping[str, str], baseline: str, data: str | os.PathLike, judge: str, *,
             baseline_label: str = "baseline", output_dir: str | os.PathLike | None = None, n_samples: int = 1,
             params: SamplingParams = GREEDY, judge_used_in_training: bool = False, kl_samples: int = 1,
             batch_size: int = 8, precision: str = "auto", max_prompt_length: int = 1024,
             rubric: str | None = None, tie_margin: float | None = None, confidence: float = 0.95,
             bootstrap_seed: int = 0, showcase_prompt: str | None = SHOWCASE_PROMPT,
             verbose: bool = True) -> EvalResult:
    """Evaluate each of `models` ({label: model}; a built-in name, HF id or folder) against
    `baseline` on the prompt records of `data`, with the judge spec `judge` (rm:PATH,
    fn:module:function or llm:MODEL); print the markdown table and return the result. With
    `output_dir`, also write eval.json and eval.md there (the folder is created at the end; the
    files are replaced atomically).

    n_samples answers per prompt and model, sampled with `params` (its n must be 1; greedy by
    default); a model's k-th answer to a prompt is judged against the baseline's k-th.
    kl_samples: sequences per prompt drawn at temperature 1 for KL(model‖baseline) when the
    judged answers are not such draws themselves (0: no KL then). judge_used_in_training
    records whether the judge built any evaluated model's training data or rewards (the table
    and the report say so). rubric / tie_margin: the llm: judge's (None: its defaults).
    showcase_prompt: also answered by every model, for the report (None: not asked). verbose:
    print the prompt file's load line and the table (progress bars show either way).
    Errors: ValueError (one line) for a bad option, prompt record or judge, before any model loads.
    """
    _check_options(models, baseline_label, judge, n_samples, params, kl_samples, confidence, output_dir)
    resolved = resolve_precision(precision)
    inputs, summary = _prompts_of_each(models, baseline, baseline_label, str(data), max_prompt_length)
    prompts = inputs[baseline_label][1]
    judged_by, judge_meta = _load_judge(judge, rubric, tie_margin, batch_size, precision)
    judge_meta["used_in_training"] = bool(judge_used_in_training)
    if verbose:
        print(summary, file=sys.stderr)
    seconds: dict[str, float] = {}
    answers, kl = _sample_all({baseline_label: baseline, **models}, baseline_label, inputs,
                              replace(params, n=n_samples), kl_samples=kl_samples, batch_size=batch_size,
                              precision=resolved, showcase_prompt=showcase_prompt, seconds=seconds)
    start = time.perf_counter()
    scores, outcomes, verdicts = _judge_all(judged_by, prompts, answers, list(models), baseline_label)
    seconds["judge"] = time.perf_counter() - start

    def result_of(label: str, name: str, comparison: Comparison | None) -> ModelResult:
        a = answers[label]
        return ModelResult(label, name, float(np.mean(a.lengths)), float(_chars(a).mean()),
                           float(np.mean([[r == "eos" for r in row] for row in a.finish_reasons])),
                           float(scores[label].mean()) if scores else None, comparison)

    base_chars = _chars(answers[baseline_label])
    results = [result_of(label, name, _compare(outcomes[label], _chars(answers[label]) - base_chars, kl[label],
                                               confidence, bootstrap_seed))
               for label, name in models.items()]
    showcase = None if showcase_prompt is None else {
        "prompt": showcase_prompt, "answers": {label: a.showcase for label, a in answers.items()}}
    result = EvalResult(judge_meta, result_of(baseline_label, baseline, None), results, len(prompts), n_samples,
                        {**asdict(replace(params, n=n_samples)), "stop_strings": list(params.stop_strings),
                         "precision": resolved}, confidence,
                        _sample_rows(prompts, answers, scores, outcomes, verdicts), showcase, seconds)
    if output_dir is not None:
        write_result(result, output_dir)
    if verbose:
        print(result.markdown())
        if output_dir is not None:
            print(f"wrote {Path(output_dir) / 'eval.json'} and eval.md")
    return result


def _load_judge(judge: str, rubric: str | None, tie_margin: float | None, batch_size: int,
                precision: str) -> tuple[LLMJudge | Scorer, dict]:
    """The judge of the spec (an LLMJudge for llm:, a Scorer otherwise) and its metadata."""
    if is_pairwise(judge):
        llm = load_judge(judge, rubric=rubric, tie_margin=DEFAULT_TIE_MARGIN if tie_margin is None else tie_margin,
                         batch_size=batch_size, precision=precision)
        return llm, {**llm.metadata(), "kind": parse_spec(judge)[0]}
    if rubric is not None or tie_margin is not None:
        raise ValueError(f"--rubric, --tie-margin: only for an llm: judge, not {judge}")
    scorer = load_scorer(judge, batch_size=batch_size, precision=precision)
    return scorer, {"spec": scorer.spec, "kind": parse_spec(judge)[0]}


def _prompts_of_each(models: Mapping[str, str], baseline: str, baseline_label: str, data: str,
                     max_prompt_length: int) -> tuple[dict[str, tuple], str]:
    """({label: (tokenizer, prompts tokenized by it)} of the baseline (first) and each model, and
    the baseline's load summary line): every prompt record and model name is checked before any
    weights load. ValueError when a model keeps other prompts than the baseline (its tokenizer
    makes others too long) or under 2 prompts are left."""
    inputs = {}
    for label, name in {baseline_label: baseline, **models}.items():
        tokenizer = load_tokenizer(name)
        prompts, report = load_prompts(data, tokenizer, max_prompt_length=max_prompt_length)
        if label == baseline_label:
            summary = report.summary()
            if len(prompts) < 2:
                raise ValueError(f"{data}: {len(prompts)} prompt left; an interval needs at least 2")
        elif [p.source_index for p in prompts] != [p.source_index for p in inputs[baseline_label][1]]:
            raise ValueError(f"{data}: model {label}'s tokenizer leaves out other prompts than the baseline's as "
                             f"longer than --max-prompt-length {max_prompt_length}; raise it so both keep the same "
                             "prompts")
        inputs[label] = (tokenizer, prompts)
    return inputs, summary


def _sample_all(models: Mapping[str, str], baseline_label: str, inputs: dict[str, tuple], params: SamplingParams, *,
                kl_samples: int, batch_size: int, precision: str, showcase_prompt: str | None,
                seconds: dict[str, float]):
    """({label: Answers}, {label: KL tuple}) of `models` ({label: model}, the baseline's label
    first), each with its (tokenizer, prompts) from `inputs`. The baseline stays loaded for the
    KL estimate; each other model is loaded in turn."""
    answers, kl, base_model = {}, {}, None
    for label, name in models.items():
        start = time.perf_counter()
        tokenizer, prompts = inputs[label]
        model = load_causal_lm(name)
        sampler = Sampler(model, tokenizer, precision=precision, batch_size=batch_size)
        gen = _generate(sampler, prompts, params, f"sampling {label}")
        answers[label] = _answers(gen, params.n, _showcase_answer(sampler, showcase_prompt, params))
        if label == baseline_label:
            base_model = model
        else:
            kl[label] = _kl(model, base_model, tokenizer, inputs[baseline_label][0], sampler, prompts, gen, params,
                            kl_samples, batch_size, precision, label)
        seconds[f"sample/{label}"] = time.perf_counter() - start
    return answers, kl


def _judge_all(judged_by: LLMJudge | Scorer, prompts: list[TokenizedPrompt], answers: dict[str, Answers],
               labels: list[str], baseline_label: str):
    """({label: [P, K] scores} (empty for an llm: judge), {label: [P, K] outcomes} of each model
    against the baseline, {label: verdict records} (llm: only))."""
    conversations, records = [p.messages for p in prompts], [p.record for p in prompts]
    if isinstance(judged_by, LLMJudge):
        judged = {label: _outcomes_llm(judged_by, conversations, answers[label], answers[baseline_label])
                  for label in labels}
        return {}, {label: o for label, (o, _) in judged.items()}, {label: v for label, (_, v) in judged.items()}
    scores = {label: _scores(judged_by, conversations, records, a) for label, a in answers.items()}
    return scores, {label: outcomes_from_scores(scores[label], scores[baseline_label]) for label in labels}, {}


def _chars(answers: Answers) -> np.ndarray:
    """[P, K] characters per answer."""
    return np.array([[len(t) for t in row] for row in answers.texts], dtype=np.float64)


def _compare(y: np.ndarray, length_diff: np.ndarray, kl: tuple, confidence: float, seed: int) -> Comparison:
    return Comparison(win_rate(y), bootstrap_interval(y, confidence=confidence, seed=seed),
                      length_controlled_win_rate(y, length_diff),
                      length_controlled_interval(y, length_diff, confidence=confidence, seed=seed),
                      int((y == 1).sum()), int((y == 0.5).sum()), int((y == 0).sum()), *kl)


def _sample_rows(prompts: list[TokenizedPrompt], answers: dict[str, Answers], scores: dict, outcomes: dict,
                 verdicts: dict) -> list[dict]:
    """eval.json's "samples": per prompt, every model's answers and what the judge made of them."""
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt_index": prompt.source_index, "prompt": prompt_text(prompt.messages),
               "answers": {label: a.texts[i] for label, a in answers.items()},
               "finish_reasons": {label: a.finish_reasons[i] for label, a in answers.items()},
               "lengths": {label: a.lengths[i] for label, a in answers.items()},
               "outcomes": {label: o[i].tolist() for label, o in outcomes.items()}}
        if scores:
            row["scores"] = {label: s[i].tolist() for label, s in scores.items()}
        if verdicts:
            row["verdicts"] = {label: v[i] for label, v in verdicts.items()}
        rows.append(row)
    return rows


def _kl(model, base_model, tokenizer, base_tokenizer, sampler: Sampler, prompts: list[TokenizedPrompt],
        gen: Generation, params: SamplingParams, kl_samples: int, batch_size: int, precision: str, label: str):
    """(estimate, standard error, sequences, note) of KL(model‖baseline) on these prompts."""
    if not same_tokenization(tokenizer, base_tokenizer):
        return None, None, 0, "not estimated: the model and the baseline tokenize differently"
    if not _is_plain_sampling(params):
        if kl_samples == 0:
            return None, None, 0, "not estimated: kl_samples=0 and the judged answers are not temperature-1 samples"
        gen = _generate(sampler, prompts, SamplingParams(n=kl_samples, max_new_tokens=params.max_new_tokens,
                                                         temperature=1.0, stop_strings=params.stop_strings,
                                                         seed=params.seed), f"KL samples {label}")
    ratios = (sequence_logprobs(model, gen, batch_size=batch_size, precision=precision)
              - sequence_logprobs(base_model, gen, batch_size=batch_size, precision=precision))
    estimate, error = kl_estimate(ratios.numpy())
    return estimate, error, len(ratios), ""


def write_result(result: EvalResult, output_dir: str | os.PathLike) -> None:
    """eval.json and eval.md (the table, then every prompt's answers side by side) in output_dir
    (created), each via a temporary file renamed into place."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    write_text_atomic(out / "eval.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(out / "eval.md", result.markdown() + "\n\n" + side_by_side(data) + "\n")


def side_by_side(result: dict) -> str:
    """A markdown table: each prompt, then each model's first answer (the baseline's first)."""
    labels = [result["baseline"]["label"], *(m["label"] for m in result["models"])]

    def cell(text: str) -> str:
        # Markdown viewers render inline HTML: a model's "<script>" must stay text.
        escaped = html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")
        return escaped or "(empty)"

    lines = ["| prompt | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for row in result["samples"]:
        lines.append(f"| {cell(row['prompt'])} | " + " | ".join(cell(row["answers"][l][0]) for l in labels) + " |")
    return "\n".join(lines)

