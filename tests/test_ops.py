"""posttrain.ops: hand-derived numbers, properties, and the aggregate normaliser contract."""

import math

import pytest
import torch

from posttrain import ops
from posttrain.losses import chunked_logprobs


def test_entropy_from_logits_hand_numbers_and_reference():
    # Uniform over 4 -> ln 4 = 1.3862944.
    # [0, ln 3] -> p = [1/4, 3/4]: H = 1/4·ln 4 + 3/4·ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351.
    # A −inf logit (masked vocabulary entry) has p = 0 and adds nothing, rather than NaN.
    logits = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, math.log(3.0), -math.inf, -math.inf]])
    torch.testing.assert_close(ops.entropy_from_logits(logits), torch.tensor([math.log(4.0), 0.5623351]))
    torch.manual_seed(0)
    random_logits = torch.randn(3, 4, 11)
    reference = torch.distributions.Categorical(logits=random_logits).entropy()
    torch.testing.assert_close(ops.entropy_from_logits(random_logits, chunk_rows=5), reference)


def test_masked_sum_and_mean_hand_numbers_and_empty_row():
    # Row 0 includes 1, 2 -> sum 3, mean 1.5. Row 1 includes nothing (and holds NaN) -> 0, 0.
    x = torch.tensor([[1.0, 2.0, 3.0], [math.nan, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(ops.masked_sum(x, mask), torch.tensor(3.0))
    torch.testing.assert_close(ops.masked_mean(x, mask), torch.tensor(1.5))
    torch.testing.assert_close(ops.masked_sum(x, mask, dim=-1), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(ops.masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0]))


def test_masked_var_hand_numbers():
    # Included [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2 -> unbiased 2/2 = 1, biased 2/3.
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(ops.masked_var(x, mask), torch.tensor(1.0))
    torch.testing.assert_close(ops.masked_var(x, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    with pytest.raises(ValueError, match="needs at least 2"):
        ops.masked_var(x, torch.tensor([True, False, False, False]))


def test_masked_whiten_hand_numbers():
    # Included [2, 4, 6]: mean 4, unbiased var (4 + 0 + 4)/2 = 4, std 2 -> [-1, 0, 1];
    # shift_mean=False adds the mean back -> [3, 4, 5]. The excluded position becomes 0.
    x = torch.tensor([[2.0, 4.0], [6.0, 99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(ops.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(ops.masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0], [5.0, 0.0]]))


def test_masked_whiten_leaves_no_nan_for_an_empty_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [math.nan, math.inf, 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    whitened = ops.masked_whiten(x, mask)
    assert torch.isfinite(whitened).all()
    assert (whitened[1] == 0).all()


def test_masked_var_and_whiten_match_trl_oracle():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    # TRL 1.16 no longer ships masked_whiten/masked_var (grep finds neither); its nanstd is
    # the same Bessel-corrected estimate over the entries that count, so excluded entries
    # are set to NaN for it. Whitening is then checked against (x - mean) / sqrt(var + 1e-8).
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.3
    mask[2] = False
    trl_std = trl_utils.nanstd(torch.where(mask, x, math.nan))
    torch.testing.assert_close(ops.masked_var(x, mask), trl_std**2, atol=1e-6, rtol=0)
    mean = x[mask].mean()
    expected = (x - mean) / torch.sqrt(trl_std**2 + 1e-8)
    torch.testing.assert_close(ops.masked_whiten(x, mask)[mask], expected[mask], atol=1e-6, rtol=0)


def test_chunked_logprobs_and_entropy_match_trl_oracle():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 6, 5), torch.randn(13, 5)
    logits = hidden @ weight.T
    labels = torch.randint(0, 13, (3, 6))
    ours = chunked_logprobs(hidden, weight, labels, torch.ones(3, 6, dtype=torch.bool), chunk_size=4)
    torch.testing.assert_close(ours, trl_utils.selective_log_softmax(logits, labels), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ops.entropy_from_logits(logits), trl_utils.entropy_from_logits(logits), atol=1e-6, rtol=0
    )


def test_first_true_index():
    # First True at 1, at 0, none (-> T = 4).
    mask = torch.tensor([[False, True, True, False], [True, False, False, True], [False] * 4])
    assert ops.first_true_index(mask).tolist() == [1, 0, 4]


def test_response_mask_until_stop_includes_the_stop_token():
    # stop ids {2, 7}; pad 0.
    # Row 0: stop (2) at index 2 -> include 0..2.
    # Row 1: no stop, truncated -> everything but the pads.
    # Row 2: pad == stop style (the EOS 7 at index 1 counts, later 7s do not).
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 5, 0, 0], [5, 7, 7, 7, 7]])
    mask = ops.response_mask_until_stop(tokens, [2, 7], pad_id=0)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, False, False],
        [True, True, False, False, False],
    ]
    assert ops.response_mask_until_stop(tokens[1:2], [2]).all()


def test_aggregate_hand_numbers_and_empty_row():
    # Token mode: (1 + 2 + 4) / 3 tokens = 7/3 = 2.3333333.
    # Sequence mode: row means 1.5 and 4, the empty third row is not a sequence -> (1.5 + 4)/2 = 2.75.
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [math.nan, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    torch.testing.assert_close(ops.aggregate(per_token, mask, "token"), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(ops.aggregate(per_token, mask, "sequence"), torch.tensor(2.75))
    assert ops.aggregate_count(mask, "token").item() == 3
    assert ops.aggregate_count(mask, "sequence").item() == 2
    empty = torch.zeros_like(mask)
    assert ops.aggregate(per_token, empty, "token").item() == 0.0
    with pytest.raises(ValueError, match="mode='mean'"):
        ops.aggregate(per_token, mask, "mean")


def _per_token_loss(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient depends on every token: (x·w)² per token."""
    return (x * weight) ** 2


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_aggregate_gradient_accumulation_and_data_parallel_equal_one_batch(mode):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    mask = torch.rand(8, 6) > 0.4
    mask[3] = False  # an empty row must not disturb any of the three
    weight = torch.randn(6, requires_grad=True)

    full = ops.aggregate(_per_token_loss(weight, x), mask, mode)
    (full_grad,) = torch.autograd.grad(full, weight)

    # Gradient accumulation: 4 micro-batches, each divided by the step's global count.
    micro = [slice(i, i + 2) for i in range(0, 8, 2)]
    global_count = sum(ops.aggregate_count(mask[s], mode) for s in micro)
    accumulated = torch.zeros(6)
    total = torch.tensor(0.0)
    for s in micro:
        loss = ops.aggregate(_per_token_loss(weight, x[s]), mask[s], mode, normalizer=global_count)
        accumulated += torch.autograd.grad(loss, weight)[0]
        total += loss.detach()
    torch.testing.assert_close(accumulated, full_grad)
    torch.testing.assert_close(total, full.detach())

    # Two data-parallel ranks with 2 micro-batches each; DDP averages gradients over ranks,
    # so every rank divides by global_count / world_size.
    world_size = 2
    rank_grads = []
    for rank_slices in (micro[:2], micro[2:]):
        grad = torch.zeros(6)
        for s in rank_slices:
            loss = ops.aggregate(
                _per_token_loss(weight, x[s]), mask[s], mode, normalizer=global_count / world_size
            )
            grad += torch.autograd.grad(loss, weight)[0]
        rank_grads.append(grad)
    torch.testing.assert_close(sum(rank_grads) / world_size, full_grad)


def test_masked_whiten_with_reduce_sum_equals_whitening_the_whole_batch():
    # Two simulated data-parallel shards: each thread whitens its half, with a reduce_sum
    # that all-reduces (sums) through a barrier; together they must equal whitening the
    # full batch in one process, ragged masks included.
    import threading

    from posttrain.ops import masked_whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(6, 5, generator=g) > 0.3
    full = masked_whiten(x, mask)
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    slots, out = [None, None], [None, None]
    barrier = threading.Barrier(2)

    def all_reduce(rank):
        def reduce_sum(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce_sum

    def worker(rank):
        out[rank] = masked_whiten(*shards[rank], reduce_sum=all_reduce(rank))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), full)
    # Without the reduction each shard whitens on its own statistics, which differ.
    assert not torch.allclose(masked_whiten(*shards[0]), full[:3])
