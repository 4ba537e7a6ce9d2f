"""Tensor primitives shared by every loss and trainer: entropy, masked reductions, stops.

Torch only. Shape letters: B batch, T sequence, A response tokens, V vocabulary.
Masks are named after what they include and True means "counts".
"""

from collections.abc import Callable

import torch

_DEFAULT_CHUNK_ROWS = 256


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: log-sum-exp in half precision loses the small probabilities."""
    return torch.promote_types(dtype, torch.float32)


def entropy_from_logits(logits: torch.Tensor, *, chunk_rows: int = _DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Entropy of softmax(logits) per position, H = logsumexp(x) − Σ softmax(x)·x (nats).

    logits: [..., V]. Returns [...] in at least float32, computed over row chunks.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    dtype = _float_dtype(logits.dtype)
    parts = [_entropy_of_rows(chunk.to(dtype)) for chunk in rows.split(chunk_rows)]
    return torch.cat(parts).view(logits.shape[:-1])


def _entropy_of_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N]. Zero-probability entries (−inf logits, e.g. a masked vocabulary) add 0,
    not 0·(−inf) = NaN."""
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is True, over ``dim`` (all dims if None). x, mask: same shape.

    Uses ``where`` rather than ``x * mask`` so NaN/inf in excluded positions cannot leak.
    """
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions mask includes; 0 (not NaN) where nothing is included."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, *,
               reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Variance of all included elements of x (scalar). Bessel-corrected when ``unbiased``.

    ``reduce_sum``, when given, sums a tensor over data-parallel processes (e.g. an
    all-reduce); the variance is then that of the included elements of every process.
    Raises ValueError when the mask includes too few elements for the estimate.
    """
    total = _identity if reduce_sum is None else reduce_sum
    count = int(total(mask.sum()))
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"masked_var: mask includes {count} element(s), needs at least {needed}")
    mean = total(masked_sum(x, mask)) / count
    return total(masked_sum((x - mean) ** 2, mask)) / (count - 1 if unbiased else count)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the included elements; excluded positions become 0.

    Uses the unbiased variance. With ``shift_mean=False`` the mean is added back, so only the
    scale changes (the convention for whitening rewards, which keeps their sign). With
    ``reduce_sum`` (see ``masked_var``) mean and variance are those of all processes' elements,
    so data-parallel runs whiten as one batch would.
    """
    total = _identity if reduce_sum is None else reduce_sum
    mean = total(masked_sum(x, mask)) / total(mask.sum()).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask, reduce_sum=reduce_sum) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def first_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim: [B, T] bool -> [B] long; T where none."""
    # argmax returns the first maximal index, documented for CPU and CUDA alike.
    first = mask.to(torch.uint8).argmax(dim=-1)
    return torch.where(mask.any(dim=-1), first, mask.shape[-1])


def response_mask_until_stop(
    tokens: torch.Tensor, stop_ids: list[int] | tuple[int, ...], *, pad_id: int | None = None
) -> torch.Tensor:
    """Mask over generated tokens up to and including the first stop token.

    tokens: [B, A] generated response tokens. Returns [B, A] bool. A row with no stop token
    (truncated at the length limit) is included in full, except tokens equal to ``pad_id``
    when given. The stop token itself counts even if it equals ``pad_id`` (models whose pad
    is their EOS), because the reward is placed on it.
    """
    if not stop_ids:
        raise ValueError("response_mask_until_stop: stop_ids is empty")
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    stop_at = first_true_index(is_stop).unsqueeze(-1)
    mask = positions <= stop_at
    if pad_id is not None:
        mask &= (tokens != pad_id) | (positions == stop_at)
    return mask


def _count_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum()


def _count_sequences(mask: torch.Tensor) -> torch.Tensor:
    return mask.any(dim=-1).sum()


def _sum_tokens(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(per_token, mask)


def _sum_sequence_means(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(per_token, mask, dim=-1).sum()


# mode -> (numerator over this micro-batch, the count its normaliser is made of)
_AGGREGATIONS = {
    "token": (_sum_tokens, _count_tokens),
    "sequence": (_sum_sequence_means, _count_sequences),
}


def _aggregation(mode: str):
    if mode not in _AGGREGATIONS:
        raise ValueError(f"aggregate: mode={mode!r}, expected one of {sorted(_AGGREGATIONS)}")
    return _AGGREGATIONS[mode]


LOSS_TYPES = {"grpo": "sequence", "dapo": "token", "dr_grpo": "token"}
"""Critic-free loss reductions by name -> `aggregate` mode. grpo: each response's token mean,
averaged over responses (Shao et al. 2024, Eq. 3); dapo: one mean over every token of the
batch (Yu et al. 2025, Eq. 8); dr_grpo: the token sum over responses × max_new_tokens, a
constant (Liu et al. 2025, §3.2) — the caller passes that normaliser."""


def aggregate_count(mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """The count ``aggregate`` divides by in ``mode`` for this mask (a long scalar).

    "token": included tokens. "sequence": rows with at least one included token.
    mask: [B, T] bool. Trainers sum this over micro-batches and processes to build the
    global normaliser (see ``aggregate``).
    """
    return _aggregation(mode)[1](mask)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token",
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar. The one place that divides by counts.

    mode "token":    Σ_{b,t} mask·loss / normalizer      (every token weighs the same)
    mode "sequence": Σ_b mean_t(loss | mask_b) / normalizer  (every sequence weighs the same)
    Rows with no included token contribute 0 and no NaN. ``normalizer`` defaults to
    ``aggregate_count(mask, mode)`` of this batch (at least 1).

    To make an optimiser step equal one big batch, the trainer passes:
    * gradient accumulation over M micro-batches on one process:
      normalizer = Σ_m aggregate_count(mask_m, mode), and calls backward on each
      micro-batch's result with no further division by M;
    * W data-parallel processes whose gradients are averaged (DDP all-reduce mean):
      normalizer = all_reduce_sum(Σ_m aggregate_count(mask_m, mode)) / W on every process,
      because DDP's division by W then restores the global count.
    The returned values then sum (over micro-batches, averaged over processes) to the loss of
    the whole step's batch.
    """
    numerator, count = _aggregation(mode)
    if normalizer is None:
        normalizer = count(mask).clamp(min=1)
    return numerator(per_token, mask) / normalizer
