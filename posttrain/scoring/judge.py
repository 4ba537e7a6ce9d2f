"""An LLM judge for pairs, `llm:MODEL`: which of two responses is better, read from the judge's
next-token probabilities of the labels "A" and "B", never parsed from generated text.

A rubric (DEFAULT_RUBRIC, or a file with the placeholders {prompt}, {response_a} and
{response_b}) is rendered as one user turn with the judge's chat template and generation
prompt; p(A) is the softmax over the two label tokens' logits at the next position (one
forward pass of the prompt, no generation). LLM judges favour a position (Zheng et al. 2023,
"Judging LLM-as-a-Judge", §3.3), so every pair (x, y) is judged in both orders:

    P(x better than y) = (p_A(x, y) + 1 − p_A(y, x)) / 2

where p_A(x, y) is p(A) with x shown as A. A bias δ toward position A adds δ to both p_A
terms and cancels. The pair is a tie when the orders disagree, |p_A(x, y) − (1 − p_A(y, x))|
> tie_margin, and is position-biased when both orders pick the same position.

Works with any Hugging Face causal LM whose chat template renders each label as one token
right after the generation prompt (checked when the judge loads).
Shapes: B prompts, T tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from posttrain.data import PreferencePair, tokenize_pair, tokenize_prompt
from posttrain.models.load import load_causal_lm, load_tokenizer
from posttrain.models.precision import autocast, resolve_precision

LABELS = ("A", "B")
"""What the judge answers: the first token of its reply names the better response."""

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")

DEFAULT_RUBRIC = """Two AI assistants answered the same user prompt. Decide which answer is better: more helpful, \
correct and clear, and following the prompt's instructions. Judge the content, not the length or the order.

[Prompt]
{prompt}

[Answer A]
{response_a}

[Answer B]
{response_b}

Which answer is better? Reply with a single letter: A or B."""

DEFAULT_TIE_MARGIN = 0.5
"""Orders whose P(x better) differ by more than this are a tie. 0.5 lets a judge lean on the
position (0.8 in one order, 0.4 in the other: disagreement 0.4, kept, and flagged as
position-biased) but not contradict itself outright (0.9 and 0.2: disagreement 0.7, a tie)."""


@dataclass(frozen=True)
class Rubric:
    """The judge's prompt template. name: "default" or the file it came from."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, prompt: str, response_a: str, response_b: str) -> str:
        # Plain replacement, not str.format: a rubric may hold other braces (JSON, code).
        out = self.text
        for placeholder, value in zip(PLACEHOLDERS, (prompt, response_a, response_b)):
            out = out.replace(placeholder, value)
        return out


def load_rubric(path: str | None) -> Rubric:
    """DEFAULT_RUBRIC, or the UTF-8 file `path`; ValueError naming the file if it lacks a placeholder."""
    if path is None:
        return Rubric("default", DEFAULT_RUBRIC)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"rubric {path}: no such file")
    text = file.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"rubric {path}: expected the placeholders {', '.join(PLACEHOLDERS)}, missing "
                         f"{', '.join(missing)}")
    return Rubric(str(path), text)


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """The {prompt} a rubric shows: a user string as is; a conversation as "role: content"
    blocks separated by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


ProbA = Callable[[list, list[str], list[str]], list[float]]
"""(B prompts, B responses shown as A, B responses shown as B) -> B values of p(A) in [0, 1]."""


@dataclass(frozen=True)
class Verdict:
    """The judge on one pair (x, y), both orders."""

    p_ab: float
    """p(A) with x shown as A and y as B."""
    p_ba: float
    """p(A) with y shown as A and x as B."""
    p_first: float
    """P(x better than y) = (p_ab + 1 − p_ba) / 2; a constant pull toward one position cancels."""
    tie: bool
    """|p_ab − (1 − p_ba)| > tie_margin: the two orders disagree about x; no pair is made."""
    position_bias: bool
    """Both orders picked the same position (both p(A) > 0.5, or both < 0.5)."""


def verdict(p_ab: float, p_ba: float, *, tie_margin: float) -> Verdict:
    """Combine the two orders of one pair (see the module docstring)."""
    x_first, x_second = p_ab, 1.0 - p_ba
    biased = (p_ab > 0.5 and p_ba > 0.5) or (p_ab < 0.5 and p_ba < 0.5)
    return Verdict(p_ab, p_ba, (x_first + x_second) / 2, abs(x_first - x_second) > tie_margin, biased)


@dataclass
class LLMJudge:
    """`llm:MODEL` (or any p(A) function, e.g. a fake in tests) and how its verdicts combine."""

    prob_a: ProbA
    """p(A) of a batch of (prompt, A, B) triples."""
    spec: str
    rubric: Rubric
    tie_margin: float = DEFAULT_TIE_MARGIN

    def __post_init__(self):
        check_pairing_options("all", 0.0, self.tie_margin)

    def compare(self, prompts: list, firsts: list[str], seconds: list[str]) -> list[Verdict]:
        """B verdicts on (firsts[i], seconds[i]) answering prompts[i], from one call of prob_a
        over both orders (2B triples)."""
        p = self.prob_a(list(prompts) * 2, list(firsts) + list(seconds), list(seconds) + list(firsts))
        n = len(firsts)
        return [verdict(p[i], p[n + i], tie_margin=self.tie_margin) for i in range(n)]

    def metadata(self) -> dict:
        return {"spec": self.spec, "rubric": self.rubric.name, "rubric_sha256": self.rubric.sha256[:16],
                "tie_margin": self.tie_margin}


def label_token_ids(tokenizer, spec: str) -> tuple[int, int]:
    """Ids of LABELS as the judge's template renders them right after the generation prompt
    (with or without a leading space, whatever it produces); ValueError naming the judge and
    the label unless each is one token of the vocabulary, and the two differ."""
    probe = [{"role": "user", "content": "?"}]
    a, b = ([{"role": "assistant", "content": label}] for label in LABELS)
    pair = tokenize_pair(PreferencePair(probe, a, b, None, 0), tokenizer)
    ids = []
    for label, reply in zip(LABELS, (pair.chosen_ids, pair.rejected_ids)):
        tokens = reply[:-1]  # the reply's ids through its end-of-turn EOS, less the EOS
        if len(tokens) != 1:
            raise ValueError(f"{spec}: label {label!r} is {len(tokens)} tokens "
                             f"{tokenizer.convert_ids_to_tokens(tokens)} right after the generation prompt, "
                             "expected one; this judge's tokenizer cannot answer with one token")
        if tokens[0] == tokenizer.unk_token_id:
            raise ValueError(f"{spec}: label {label!r} is not in the tokenizer's vocabulary (it encodes to "
                             f"{tokenizer.unk_token!r})")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ValueError(f"{spec}: labels {LABELS} encode to the same token {ids[0]}")
    return ids[0], ids[1]


class NextTokenLabels:
    """The real p(A): the judge LM's next-token softmax over the two label tokens, after the
    rubric rendered as one user turn with the generation prompt. Batches of left-padded
    prompts, position ids counted from each row's first real token, one forward each."""

    def __init__(self, model, tokenizer, rubric: Rubric, spec: str, *, batch_size: int = 8,
                 precision: str = "fp32"):
        if batch_size < 1:
            raise ValueError(f"{spec}: batch_size must be ≥ 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.spec = spec
        self.batch_size = batch_size
        self.precision = precision
        self.label_ids = list(label_token_ids(tokenizer, spec))

    def encode(self, prompt, response_a: str, response_b: str) -> list[int]:
        """Token ids [T] of the rendered rubric as one user turn, ending with the generation prompt."""
        user = self.rubric.render(prompt_text(prompt), response_a, response_b)
        return tokenize_prompt([{"role": "user", "content": user}], self.tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list, response_as: list[str], response_bs: list[str]) -> list[float]:
        sequences = [self.encode(p, a, b) for p, a, b in zip(prompts, response_as, response_bs)]
        device = next(self.model.parameters()).device
        out = []
        bar = tqdm(total=len(sequences), desc=f"judging ({self.spec})", unit="prompt", disable=None, leave=False,
                   file=sys.stderr)
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start: start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):  # left padding: every row's next token is the last column
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            with autocast(self.precision, device.type):
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    position_ids=positions.to(device), use_cache=False, logits_to_keep=1).logits
            # logits [B, 1, V] -> the two labels' [B, 2] -> p(A) [B]
            out += logits[:, -1, self.label_ids].float().softmax(-1)[:, 0].cpu().tolist()
            bar.update(len(chunk))
        bar.close()
        return out


def load_llm_judge(target: str, spec: str, *, rubric: str | None = None, tie_margin: float = DEFAULT_TIE_MARGIN,
                   batch_size: int = 8, precision: str = "auto", device: str | torch.device = "cpu") -> LLMJudge:
    """The judge of `llm:{target}` (any causal LM: hub id, folder or built-in name), frozen and
    stored in the compute precision; the rubric file and the labels are checked first."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device.type)
    chosen_rubric = load_rubric(rubric)
    try:
        tokenizer = load_tokenizer(target)
    except (OSError, ValueError) as err:
        raise ValueError(f"{spec}: cannot load the judge's tokenizer ({str(err).strip().splitlines()[0]})") from None
    label_token_ids(tokenizer, spec)
    model = load_causal_lm(target, dtype=torch.bfloat16 if resolved == "bf16" else torch.float32).to(device)
    prob_a = NextTokenLabels(model, tokenizer, chosen_rubric, spec, batch_size=batch_size, precision=resolved)
    return LLMJudge(prob_a, spec, chosen_rubric, tie_margin)


# ---------------------------------------------------------------- pairing


def win_matrix(n: int, verdicts: dict[tuple[int, int], Verdict]) -> list[list[float]]:
    """win[i][j] = P(response i better than j) over n responses, from verdicts on pairs i < j;
    a tie counts 0.5 both ways (the judge could not tell); the diagonal is 0."""
    win = [[0.0] * n for _ in range(n)]
    for (i, j), v in verdicts.items():
        p = 0.5 if v.tie else v.p_first
        win[i][j], win[j][i] = p, 1.0 - p
    return win


def ranking(win: list[list[float]]) -> list[int]:
    """Responses from best to worst by mean win probability against all others (first index
    first among equals)."""
    n = len(win)
    mean = [sum(row) / (n - 1) for row in win]
    return sorted(range(n), key=lambda i: (-mean[i], i))


def pairs_all(win: list[list[float]]) -> list[tuple[int, int]]:
    """Every pair i < j."""
    return [(i, j) for i in range(len(win)) for j in range(i + 1, len(win))]


def pairs_best_vs_rest(win: list[list[float]]) -> list[tuple[int, int]]:
    """The best-ranked response with each other one."""
    order = ranking(win)
    return [tuple(sorted((order[0], j))) for j in order[1:]]


def pairs_best_vs_worst(win: list[list[float]]) -> list[tuple[int, int]]:
    """The best-ranked response with the worst-ranked one."""
    order = ranking(win)
    return [tuple(sorted((order[0], order[-1])))]


JUDGE_PAIRINGS = {"all": pairs_all, "best_vs_rest": pairs_best_vs_rest, "best_vs_worst": pairs_best_vs_worst}
"""--pairing for an LLM judge: which judged pairs become preference pairs. Every pair of a
record's responses is judged (the ranking needs them all); each pair written is oriented by
its own verdict, so the chosen response is the one the judge preferred in that comparison."""


def check_pairing_options(pairing: str, min_score_gap: float, tie_margin: float) -> None:
    """ValueError naming the option unless the pairing is known, 0 ≤ min_score_gap < 0.5 (a
    preference is within 0.5 of even) and 0 ≤ tie_margin ≤ 1."""
    if pairing not in JUDGE_PAIRINGS:
        raise ValueError(f"pairing: expected one of {list(JUDGE_PAIRINGS)}, got {pairing!r}")
    if not 0 <= min_score_gap < 0.5:
        raise ValueError(f"min_score_gap: an LLM judge's preference lies within 0.5 of even; expected a gap in "
                         f"[0, 0.5), got {min_score_gap}")
    if not 0 <= tie_margin <= 1:
        raise ValueError(f"tie_margin: expected a value in [0, 1], got {tie_margin}")


def select_pairs(n: int, verdicts: dict[tuple[int, int], Verdict], *, pairing: str,
                 min_score_gap: float = 0.0) -> tuple[list[tuple[int, int, Verdict]], int]:
    """(chosen, rejected, verdict on (min, max) of the two) for the pairs `pairing` picks among n
    responses, and how many of those it dropped as within min_score_gap of 0.5 (no clear
    preference, 0.5 itself included). Ties are never pairs."""
    check_pairing_options(pairing, min_score_gap, 0.0)
    out, within_gap = [], 0
    for i, j in JUDGE_PAIRINGS[pairing](win_matrix(n, verdicts)):
        v = verdicts[(i, j)]
        if v.tie:
            continue
        if abs(v.p_first - 0.5) <= min_score_gap:
            within_gap += 1
            continue
        out.append((i, j, v) if v.p_first > 0.5 else (j, i, v))
    return out, within_gap
