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
from posttrain.eval.format import FORMAT, SHOWCASE_PROMPT, markdown_table, side_by_side, write_text_atomic
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
    """Wall time per step ("sample/LABEL", "kl/BASELINE", "judge"), shared by the evals of one run."""
    data_summary: str = ""
    """The prompt file's load line: records read, kept and left out (and why)."""

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self),
                "intervals": f"{self.confidence:.0%} percentile bootstrap over prompts",
                "length_control": "logistic regression of the outcome on tanh(Δchars / std Δchars), read at Δ = 0"}

    def markdown(self) -> str:
        """A short markdown table of the numbers, after one line naming the judge."""
        return markdown_table(self.to_dict())


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


def _showcase_answer(sampler: Sampler, text: str | None, params: SamplingParams, prompts: list[TokenizedPrompt],
                     gen: Generation) -> str | None:
    """The answer to the showcase prompt: the eval's own first answer when the prompt is one of
    the eval's (a separate call would decode it in another batch, and bf16 greedy text can
    differ with the batch it is decoded in), else one more answer sampled for it."""
    if text is None:
        return None
    conversation = [{"role": "user", "content": text}]
    for i, prompt in enumerate(prompts):
        if prompt.messages == conversation:
            return gen.responses[i * params.n].strip()
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


def _check_types(models, baselines, judge, n_samples, params, kl_samples, confidence) -> None:
    """The API's arguments have the types evaluate documents (the CLI's always do)."""
    for what, mapping in (("models", models), ("baselines", baselines)):
        if not isinstance(mapping, Mapping):
            raise ValueError(f"evaluate: {what} must be a mapping {{label: model}}, got {mapping!r}")
        for label, model in mapping.items():
            if not isinstance(label, str) or not isinstance(model, str):
                raise ValueError(f"evaluate: {what} entry {label!r}: {model!r}: expected a label and a model name, "
                                 "both strings")
    if not isinstance(judge, str):
        raise ValueError(f"evaluate: judge must be a spec string (rm:PATH, fn:module:function, llm:MODEL), got "
                         f"{judge!r}")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"evaluate: params must be a posttrain.SamplingParams, got {params!r}")
    for name, value in (("n_samples", n_samples), ("kl_samples", kl_samples)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"evaluate: {name} must be an integer, got {value!r}")
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool):
        raise ValueError(f"evaluate: confidence must be a number in (0, 1), got {confidence!r}")


def same_model(a: str, b: str) -> bool:
    """Whether two model names mean the same model: equal, or paths to the same folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_options(models: Mapping[str, str], baselines: Mapping[str, str], judge: str, n_samples: int,
                   params: SamplingParams, kl_samples: int, confidence: float) -> None:
    """evaluate_many's options, before anything loads: ValueError (one line) for the first bad one."""
    _check_types(models, baselines, judge, n_samples, params, kl_samples, confidence)
    if not models:
        raise ValueError("evaluate: no model to evaluate (give at least one --model)")
    if not baselines:
        raise ValueError("evaluate: no baseline to judge against (give at least one --baseline)")
    for label in [*models, *baselines]:
        if not label.strip():
            raise ValueError("evaluate: a model or baseline label is empty")
    for label, baseline in baselines.items():
        if label in models and not same_model(models[label], baseline):
            raise ValueError(f"evaluate: label {label!r} names model {models[label]} and baseline {baseline}; give "
                             "one another label (LABEL=MODEL)")
        if not set(models) - {label}:
            raise ValueError(f"evaluate: baseline {label!r} has no model to judge against it: its label names the "
                             "only model, which is not judged against itself")
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


def _check_output_dir(output_dir, labels: list[str] | None = None) -> None:
    """That eval.json and eval.md can be written into output_dir (with `labels`: into
    output_dir/LABEL/ for each), checked before any model loads."""
    if output_dir is None:
        return
    out = Path(output_dir)
    for folder in [out, *out.parents]:
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--output-dir {output_dir}: {folder} is a file; expected a folder")
            break
    for folder in [out] if labels is None else [out / label for label in labels]:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output-dir {output_dir}: {folder} is a file; expected a folder")
        for name in ("eval.json", "eval.md"):
            if (folder / name).is_dir():
                raise ValueError(f"--output-dir {output_dir}: {folder / name} is a folder; expected a file or nothing")


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
    _check_output_dir(output_dir)
    result = evaluate_many(models, {baseline_label: baseline}, data, judge, n_samples=n_samples, params=params,
                           judge_used_in_training=judge_used_in_training, kl_samples=kl_samples,
                           batch_size=batch_size, precision=precision, max_prompt_length=max_prompt_length,
                           rubric=rubric, tie_margin=tie_margin, confidence=confidence, bootstrap_seed=bootstrap_seed,
                           showcase_prompt=showcase_prompt, verbose=verbose)[baseline_label]
    if output_dir is not None:
        write_result(result, output_dir)
        if verbose:
            print(f"wrote {Path(output_dir) / 'eval.json'} and eval.md")
    return result


def evaluate_many(models: Mapping[str, str], baselines: Mapping[str, str], data: str | os.PathLike, judge: str, *,
                  output_dir: str | os.PathLike | None = None, n_samples: int = 1, params: SamplingParams = GREEDY,
                  judge_used_in_training: bool = False, kl_samples: int = 1, batch_size: int = 8,
                  precision: str = "auto", max_prompt_length: int = 1024, rubric: str | None = None,
                  tie_margin: float | None = None, confidence: float = 0.95, bootstrap_seed: int = 0,
                  showcase_prompt: str | None = SHOWCASE_PROMPT, verbose: bool = True) -> dict[str, EvalResult]:
    """`evaluate` against several baselines ({label: model}) in one run: every model's answers
    are sampled once, whether it is judged, judged against, or both (the SFT model of a recipe is
    judged against the start and is the baseline of DPO and PPO). A label naming a model and a
    baseline must name the same model, which is not judged against itself.

    Returns {baseline label: EvalResult}; with `output_dir`, each is written as eval.json and
    eval.md into output_dir/LABEL/. Other options and errors: `evaluate`.
    """
    check_options(models, baselines, judge, n_samples, params, kl_samples, confidence)
    for base in baselines if output_dir is not None else ():
        if base in (".", "..") or "/" in base or "\\" in base:
            raise ValueError(f"baseline label {base!r}: it names the folder OUTPUT_DIR/LABEL its eval goes to; "
                             "use a plain name")
    _check_output_dir(output_dir, list(baselines))
    resolved = resolve_precision(precision)
    everyone = {**baselines, **models}
    inputs, summary = _prompts_of_each(everyone, next(iter(baselines)), str(data), max_prompt_length)
    prompts = inputs[next(iter(baselines))][1]
    judged_by, judge_meta = _load_judge(judge, rubric, tie_margin, batch_size, precision)
    judge_meta["used_in_training"] = bool(judge_used_in_training)
    if verbose:
        print(summary)
    pairs = [(label, base) for base in baselines for label in models if label != base]
    seconds: dict[str, float] = {}
    params = replace(params, n=n_samples)
    answers, kl_runs = _sample_all(everyone, {label for label, _ in pairs}, inputs, params, kl_samples=kl_samples,
                                   batch_size=batch_size, precision=resolved, showcase_prompt=showcase_prompt,
                                   seconds=seconds)
    kl = _kl_against_baselines(pairs, everyone, inputs, kl_runs, batch_size=batch_size, precision=resolved,
                               seconds=seconds)
    start = time.perf_counter()
    scores, outcomes, verdicts = _judge_all(judged_by, prompts, answers, pairs)
    seconds["judge"] = time.perf_counter() - start

    def result_of(label: str, comparison: Comparison | None) -> ModelResult:
        a = answers[label]
        return ModelResult(label, everyone[label], float(np.mean(a.lengths)), float(_chars(a).mean()),
                           float(np.mean([[r == "eos" for r in row] for row in a.finish_reasons])),
                           float(scores[label].mean()) if scores else None, comparison)

    results = {}
    for base in baselines:
        judged = [label for label in models if label != base]
        rows = [result_of(label, _compare(outcomes[label, base], _chars(answers[label]) - _chars(answers[base]),
                                          kl[label, base], confidence, bootstrap_seed)) for label in judged]
        shown = [base, *judged]
        showcase = None if showcase_prompt is None else {
            "prompt": showcase_prompt, "answers": {label: answers[label].showcase for label in shown}}
        results[base] = EvalResult(
            judge_meta, result_of(base, None), rows, len(prompts), n_samples,
            {**asdict(params), "stop_strings": list(params.stop_strings), "precision": resolved}, confidence,
            _sample_rows(prompts, {label: answers[label] for label in shown},
                         {label: scores[label] for label in shown} if scores else {},
                         {label: outcomes[label, base] for label in judged},
                         {label: verdicts[label, base] for label in judged} if verdicts else {}),
            showcase, seconds, summary)
    for base, result in results.items():
        if output_dir is not None:
            write_result(result, Path(output_dir) / base)
        if verbose:
            print(result.markdown() + ("\n" if len(results) > 1 else ""))
    if verbose and output_dir is not None:
        print(f"wrote eval.json and eval.md into {', '.join(str(Path(output_dir) / b) for b in baselines)}")
    return results


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


def _prompts_of_each(models: Mapping[str, str], first: str, data: str,
                     max_prompt_length: int) -> tuple[dict[str, tuple], str]:
    """({label: (tokenizer, prompts tokenized by it)} of every model, and the load summary line of
    the `first` label's): every prompt record and model name is checked before any weights load.
    ValueError when a model keeps other prompts than the first (its tokenizer makes others too
    long) or under 2 prompts are left."""
    inputs = {}
    for label in [first, *(m for m in models if m != first)]:
        tokenizer = load_tokenizer(models[label])
        prompts, report = load_prompts(data, tokenizer, max_prompt_length=max_prompt_length)
        if label == first:
            summary = report.summary()
            if len(prompts) < 2:
                raise ValueError(f"{data}: {len(prompts)} prompt left; an interval needs at least 2")
        elif [p.source_index for p in prompts] != [p.source_index for p in inputs[first][1]]:
            raise ValueError(f"{data}: model {label}'s tokenizer leaves out other prompts than {first}'s as "
                             f"longer than --max-prompt-length {max_prompt_length}; raise it so both keep the same "
                             "prompts")
        inputs[label] = (tokenizer, prompts)
    return inputs, summary


@dataclass
class _KLRun:
    """A judged model's sequences for the KL estimate and their log-probabilities under it."""

    sequences: Generation
    logprobs: torch.Tensor
    """[N] sum of log π_model over each sequence's response tokens."""


def _sample_all(models: Mapping[str, str], judged: set[str], inputs: dict[str, tuple], params: SamplingParams, *,
                kl_samples: int, batch_size: int, precision: str, showcase_prompt: str | None,
                seconds: dict[str, float]) -> tuple[dict[str, Answers], dict[str, _KLRun | str]]:
    """({label: Answers} of every model, {label: _KLRun, or why there is none} of the `judged`
    ones), each model loaded in turn with its (tokenizer, prompts) from `inputs`."""
    answers, kl_runs = {}, {}
    for label, name in models.items():
        start = time.perf_counter()
        tokenizer, prompts = inputs[label]
        model = load_causal_lm(name)
        sampler = Sampler(model, tokenizer, precision=precision, batch_size=batch_size)
        gen = _generate(sampler, prompts, params, f"sampling {label}")
        answers[label] = _answers(gen, params.n, _showcase_answer(sampler, showcase_prompt, params, prompts, gen))
        if label in judged:
            kl_runs[label] = _kl_run(model, sampler, prompts, gen, params, kl_samples, batch_size, precision, label)
        seconds[f"sample/{label}"] = time.perf_counter() - start
    return answers, kl_runs


def _kl_run(model, sampler: Sampler, prompts: list[TokenizedPrompt], gen: Generation, params: SamplingParams,
            kl_samples: int, batch_size: int, precision: str, label: str) -> _KLRun | str:
    """The sequences the KL estimate averages over (the judged answers themselves when they are
    temperature-1 samples) with their log-probabilities under `model`, or why there are none."""
    if not _is_plain_sampling(params):
        if kl_samples == 0:
            return "not estimated: kl_samples=0 and the judged answers are not temperature-1 samples"
        gen = _generate(sampler, prompts, SamplingParams(n=kl_samples, max_new_tokens=params.max_new_tokens,
                                                         temperature=1.0, stop_strings=params.stop_strings,
                                                         seed=params.seed), f"KL samples {label}")
    return _KLRun(gen, sequence_logprobs(model, gen, batch_size=batch_size, precision=precision))


def _kl_against_baselines(pairs: list[tuple[str, str]], models: Mapping[str, str], inputs: dict[str, tuple],
                          kl_runs: dict[str, _KLRun | str], *, batch_size: int, precision: str,
                          seconds: dict[str, float]) -> dict[tuple[str, str], tuple]:
    """{(model, baseline): (estimate, standard error, sequences, note)} of KL(model‖baseline): the
    model's own sequences scored by each baseline in turn, loaded once for all its models."""
    kl = {}
    for base in dict.fromkeys(b for _, b in pairs):
        start = time.perf_counter()
        base_model = None
        for label in [m for m, b in pairs if b == base]:
            run = kl_runs[label]
            if isinstance(run, str):
                kl[label, base] = (None, None, 0, run)
            elif not same_tokenization(inputs[label][0], inputs[base][0]):
                kl[label, base] = (None, None, 0, "not estimated: the model and the baseline tokenize differently")
            else:
                if base_model is None:
                    base_model = load_causal_lm(models[base])
                ratios = run.logprobs - sequence_logprobs(base_model, run.sequences, batch_size=batch_size,
                                                          precision=precision)
                kl[label, base] = (*kl_estimate(ratios.numpy()), len(ratios), "")
        seconds[f"kl/{base}"] = time.perf_counter() - start
    return kl


def _judge_all(judged_by: LLMJudge | Scorer, prompts: list[TokenizedPrompt], answers: dict[str, Answers],
               pairs: list[tuple[str, str]]):
    """({label: [P, K] scores} (empty for an llm: judge), {(model, baseline): [P, K] outcomes},
    {(model, baseline): verdict records} (llm: only)) for every (model, baseline) pair."""
    conversations, records = [p.messages for p in prompts], [p.record for p in prompts]
    if isinstance(judged_by, LLMJudge):
        judged = {(m, b): _outcomes_llm(judged_by, conversations, answers[m], answers[b]) for m, b in pairs}
        return {}, {pair: o for pair, (o, _) in judged.items()}, {pair: v for pair, (_, v) in judged.items()}
    scores = {label: _scores(judged_by, conversations, records, a) for label, a in answers.items()}
    return scores, {(m, b): outcomes_from_scores(scores[m], scores[b]) for m, b in pairs}, {}


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


def write_result(result: EvalResult, output_dir: str | os.PathLike) -> None:
    """eval.json and eval.md (the table, then every prompt's answers side by side) in output_dir
    (created), each via a temporary file renamed into place."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    write_text_atomic(out / "eval.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(out / "eval.md", result.markdown() + "\n\n" + side_by_side(data) + "\n")
