"""Peak-memory probe run in a fresh process by test_loss_memory.py: ``python memory_probe.py CASE``.

Prints the peak resident-set growth (MB) of one operation above the memory its inputs hold.
Inputs are created with in-place fills so creating them leaves no transient peak behind.
"""

import os
import resource
import sys

import torch
import torch.nn.functional as F

from posttrain.losses import chunked_cross_entropy

B, T, V, H = 8, 512, 49_152, 576


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def naive_cross_entropy(hidden, weight, labels, mask):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none").view(labels.shape) * mask


def ours_cross_entropy(hidden, weight, labels, mask):
    return chunked_cross_entropy(hidden, weight, labels, mask)


def run_cross_entropy(fn) -> float:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.empty(B, T, H).normal_(generator=generator).requires_grad_()
    weight = torch.empty(V, H).normal_(std=0.02, generator=generator).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.ones(B, T, dtype=torch.bool)
    fn(hidden[:1, :4], weight, labels[:1, :4], mask[:1, :4]).sum().backward()
    hidden.grad = weight.grad = None
    before = peak_mb()
    fn(hidden, weight, labels, mask).sum().backward()
    return peak_mb() - before


CASES = {
    "cross_entropy_naive": (run_cross_entropy, naive_cross_entropy),
    "cross_entropy_ours": (run_cross_entropy, ours_cross_entropy),
}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
    runner, fn = CASES[sys.argv[1]]
    print(f"{runner(fn):.1f}")
