"""Cross-entropy and token log-probs straight from hidden states, never holding [B, T, V].

Only positions the mask includes are projected to the vocabulary, ``chunk_size`` rows at a
time; the backward recomputes each chunk's logits instead of keeping them (the
"chunked / fused linear cross-entropy" trick of Liger-Kernel and Apple's Cut
Cross-Entropy, Wijmans et al. 2024), unless all of them fit in KEEP_LOGITS_BYTES. Shapes: B batch, T sequence, H hidden, V vocabulary,
N selected tokens.
"""

import torch

from posttrain.ops import entropy_from_logits

_DEFAULT_CHUNK_SIZE = 256

KEEP_LOGITS_BYTES = 128 * 2**20
"""Largest logits [N,V] (in the matmul dtype) the forward keeps for the backward, which then
skips recomputing them. Recomputing is bit for bit the same product, so this trades memory for
time only: on SmolLM2 (V = 49152, bf16) a DPO step's 366 reply tokens keep 36 MB and spare one
[366,576]·[576,49152] product (21 GFLOP); SFT's 4 × 256 rows, 512 loss tokens, keep 50 MB."""


def _resolve_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype | None):
    """Explicit dtype wins; inside autocast use its dtype (what nn.Linear would do); else promote."""
    if compute_dtype is not None:
        return compute_dtype
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place (no [V, H] temporary) when the dtypes allow it."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(h·Wᵀ, y) per row for hidden [N, H], weight [V, H], labels [N]; optional entropy.

    Matmuls run in ``compute_dtype``; log-sum-exp, the softmax and gradient accumulation in
    at least float32. Gradients come back in each input's own dtype. The entropy output is
    a detached statistic.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype, with_entropy, keep_logits):
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            losses, entropies, kept = [], [], []
            for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
                product = h.to(compute_dtype) @ w.T
                if keep_logits:
                    kept.append(product)
                logits = product.to(acc_dtype)
                lse = torch.logsumexp(logits, dim=-1)
                losses.append(lse - logits.gather(-1, y[:, None]).squeeze(-1))
                if with_entropy:
                    entropies.append(entropy_from_logits(logits, chunk_rows=logits.shape[0]))
        loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=acc_dtype)
        entropy = torch.cat(entropies) if entropies else torch.zeros_like(loss)
        # The cast weight is kept too: the backward would cast the same [V, H] again (28 M values
        # on SmolLM2, 14 ms).
        ctx.save_for_backward(hidden, weight, labels, loss, w, *kept)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        ctx.mark_non_differentiable(entropy)
        return loss, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_entropy):
        hidden, weight, labels, loss, w, *kept = ctx.saved_tensors
        cdt, size = ctx.compute_dtype, ctx.chunk_size
        acc_dtype = loss.dtype
        grad_hidden = torch.empty_like(hidden)
        # A frozen head (LoRA, a reference) needs no [V, H] gradient: skip its matmuls. The first
        # chunk's product is cast into the [V, H] gradient rather than added to a zero-filled one
        # (the same values): a write and a read of 113 MB fewer a backward on SmolLM2.
        grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk, start in enumerate(range(0, hidden.shape[0], size)):
                h, y = hidden[start : start + size].to(cdt), labels[start : start + size]
                # A copy of a kept product even in acc_dtype: it is changed in place below.
                logits = kept[chunk].to(acc_dtype, copy=True) if kept else (h @ w.T).to(acc_dtype)
                # softmax = exp(logits − lse), and lse = loss + target logit; dCE/dlogits = p − onehot.
                lse = loss[start : start + size] + logits.gather(-1, y[:, None]).squeeze(-1)
                d_logits = torch.exp(logits.sub_(lse[:, None]))
                d_logits.scatter_add_(-1, y[:, None], torch.full_like(lse[:, None], -1.0))
                d_logits = d_logits.mul_(grad_loss[start : start + size, None]).to(cdt)
                grad_hidden[start : start + size] = d_logits @ w
                if not ctx.needs_input_grad[1]:
                    continue
                if grad_weight is None:
                    grad_weight = (d_logits.T @ h).to(acc_dtype)
                else:
                    _accumulate_matmul(grad_weight, d_logits.T, h)
        if ctx.needs_input_grad[1] and grad_weight is None:  # no selected rows: a zero gradient
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _select_and_project(hidden, lm_head_weight, labels, mask, chunk_size, compute_dtype, with_entropy):
    if hidden.shape[:-1] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"chunked cross-entropy: hidden {tuple(hidden.shape)} needs leading shape equal to "
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)}"
        )
    dtype = _resolve_compute_dtype(hidden, lm_head_weight, compute_dtype)
    selected = hidden[mask]
    keep_logits = (torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
                   and selected.shape[0] * lm_head_weight.shape[0] * dtype.itemsize <= KEEP_LOGITS_BYTES)
    loss, entropy = _LinearCrossEntropy.apply(
        selected, lm_head_weight, labels[mask], chunk_size, dtype, with_entropy, keep_logits
    )
    full_loss = loss.new_zeros(mask.shape).masked_scatter(mask, loss)
    full_entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
    return full_loss, full_entropy


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy −log softmax(hidden·Wᵀ)[label], zero where mask is False.

    hidden: [B, T, H] or [N, H], already aligned so position t predicts labels[t].
    lm_head_weight: [V, H]. labels: long, hidden's leading shape (ids at excluded positions
    are never read). mask: bool, same shape, True = a loss token.
    compute_dtype: dtype of the matmuls (e.g. torch.bfloat16 with an fp32 weight); default
    is the autocast dtype when autocast is on, else the promoted input dtype.
    Returns float32 (at least) of labels' shape. Reduce with ``posttrain.ops.aggregate``.
    """
    loss, _ = _select_and_project(hidden, lm_head_weight, labels, mask, chunk_size, compute_dtype, False)
    return loss


def chunked_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token log π(label) = −cross-entropy; zero where mask is False. Shapes as
    ``chunked_cross_entropy``."""
    loss, _ = _select_and_project(hidden, lm_head_weight, labels, mask, chunk_size, compute_dtype, False)
    return -loss


def chunked_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(label), entropy of π) per token from one pass over the vocabulary.

    Both have labels' shape and are zero where mask is False; the entropy is detached (a
    statistic for PPO logs, not a differentiable bonus).
    """
    loss, entropy = _select_and_project(hidden, lm_head_weight, labels, mask, chunk_size, compute_dtype, True)
    return -loss, entropy
