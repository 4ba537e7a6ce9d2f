"""chunked_cross_entropy / chunked_logprobs: hand numbers, F.cross_entropy, gradcheck, bf16."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain import ops
from posttrain.losses import chunked_cross_entropy, chunked_logprobs, chunked_logprobs_and_entropy
from posttrain.losses import cross_entropy


def _random_problem(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 4, generator=generator, dtype=dtype).requires_grad_()
    weight = torch.randn(11, 4, generator=generator, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.3
    mask[1] = False  # an all-masked row
    return hidden, weight, labels, mask


def test_hand_numbers():
    # h = [1, 0], W rows [0, 0] and [ln 3, 0] -> logits [0, ln 3] -> softmax [1/4, 3/4].
    # label 1: CE = -ln(3/4) = 0.2876821; label 0: CE = ln 4 = 1.3862944; masked position: 0.
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([1, 0, 1])
    mask = torch.tensor([True, True, False])
    loss = chunked_cross_entropy(hidden, weight, labels, mask)
    torch.testing.assert_close(loss, torch.tensor([0.2876821, 1.3862944, 0.0]))
    torch.testing.assert_close(chunked_logprobs(hidden, weight, labels, mask), -loss)


@pytest.mark.parametrize("keep_logits", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_matches_f_cross_entropy_values_and_grads(chunk_size, keep_logits, monkeypatch):
    if not keep_logits:
        monkeypatch.setattr(cross_entropy, "KEEP_LOGITS_BYTES", 0)
    hidden, weight, labels, mask = _random_problem()
    ours = chunked_cross_entropy(hidden, weight, labels, mask, chunk_size=chunk_size)
    naive = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), reduction="none")
    naive = naive.view(3, 5) * mask
    torch.testing.assert_close(ours, naive)
    upstream = torch.randn(3, 5)
    grads_ours = torch.autograd.grad(ours, (hidden, weight), upstream)
    grads_naive = torch.autograd.grad(naive, (hidden, weight), upstream)
    for got, expected in zip(grads_ours, grads_naive):
        torch.testing.assert_close(got, expected)


def test_flat_hidden_and_logprobs_match_log_softmax():
    hidden, weight, labels, mask = _random_problem()
    flat = chunked_logprobs(hidden.flatten(0, 1), weight, labels.flatten(), mask.flatten(), chunk_size=3)
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(flat.view(3, 5), expected)


def test_kept_logits_give_the_recomputed_gradients_bit_for_bit(monkeypatch):
    # bf16 products under autocast, as in training: keeping the logits must change nothing but
    # the time, and must be what happens below the budget (the saved tensors hold one per chunk).
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 16, generator=generator).requires_grad_()
    weight = torch.randn(300, 16, generator=generator).requires_grad_()
    labels = torch.randint(0, 300, (2, 40), generator=generator)
    mask = torch.rand(2, 40, generator=generator) > 0.2
    upstream = torch.randn(2, 40, generator=generator)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, labels, mask, chunk_size=16)
        node = next(f for f, _ in loss.grad_fn.next_functions if f is not None)
        saved = len(node.saved_tensors)
        return loss, torch.autograd.grad(loss, (hidden, weight), upstream), saved

    kept_loss, kept_grads, kept_saved = run()
    monkeypatch.setattr(cross_entropy, "KEEP_LOGITS_BYTES", 0)
    loss, grads, saved = run()
    chunks = -(-int(mask.sum()) // 16)
    assert (kept_saved, saved) == (5 + chunks, 5)
    assert torch.equal(kept_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(kept_grads, grads))


def test_no_logits_are_kept_without_gradients():
    hidden, weight, labels, mask = _random_problem()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, mask)
    assert loss.grad_fn is None


def test_gradcheck_float64_custom_backward():
    hidden, weight, labels, mask = _random_problem(dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_cross_entropy(h, w, labels, mask, chunk_size=2), (hidden, weight)
    )


def test_all_masked_gives_zeros_and_zero_grads():
    hidden, weight, labels, _ = _random_problem()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss = chunked_cross_entropy(hidden, weight, labels, mask)
    ops.aggregate(loss, mask).backward()
    assert (loss == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_entropy_output_is_detached_and_matches_logits():
    hidden, weight, labels, mask = _random_problem()
    logprobs, entropy = chunked_logprobs_and_entropy(hidden, weight, labels, mask, chunk_size=2)
    assert not entropy.requires_grad
    expected = ops.entropy_from_logits(hidden @ weight.T) * mask
    torch.testing.assert_close(entropy, expected.detach())
    torch.testing.assert_close(logprobs, chunked_logprobs(hidden, weight, labels, mask))


def test_bf16_hidden_with_fp32_weight_and_autocast():
    hidden, weight, labels, mask = _random_problem()
    reference = chunked_cross_entropy(hidden, weight, labels, mask).detach()
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    loss = chunked_cross_entropy(hidden_bf16, weight, labels, mask, compute_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: logits of size ~3 carry errors of ~1e-2.
    torch.testing.assert_close(loss.detach(), reference, atol=5e-2, rtol=2e-2)
    loss.sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all()

    hidden_fp32 = hidden.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = chunked_cross_entropy(hidden_fp32, weight, labels, mask)
    explicit = chunked_cross_entropy(hidden.detach(), weight.detach(), labels, mask, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(autocast_loss.detach(), explicit)
    autocast_loss.sum().backward()
    assert hidden_fp32.grad.dtype == torch.float32


def test_shape_mismatch_is_reported():
    hidden, weight, labels, mask = _random_problem()
    with pytest.raises(ValueError, match="leading shape"):
        chunked_cross_entropy(hidden, weight, labels[:, :4], mask)
