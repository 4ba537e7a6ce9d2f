"""Where a benchmark worker's step time and peak memory go (`run.py --profile`), the same way for
posttrain and TRL.

Time. Every moment of a timed step is charged to the innermost of these, else to "other":
  - generation: inside the tool's generate call (the workers mark it with `clock.timed`);
  - data: collating or fetching a batch (marked by the workers);
  - backward: inside torch.autograd.backward (what loss.backward() calls);
  - optimizer: inside Optimizer.step (global step hooks) and torch.nn.utils.clip_grad_norm_;
  - forward: the outermost nn.Module call made with gradients enabled (the trained model;
    posttrain's LM head and loss run inside its module, TRL's loss outside, in "other");
  - no-grad forward: the outermost nn.Module call without gradients, outside generation: the
    reference, the reward model, PPO's old log-probs and values.
A module call inside another category (a checkpointed layer replayed in backward) stays there.

Memory, split right after the last optimizer step of the warm-up (state allocated, gradients not
yet zeroed) by a scan of the live tensors, so the scan's own time falls outside the timed steps:
  - runtime: RSS once the tool's libraries are imported (Python, torch, transformers, accelerate,
    peft, and trl or posttrain's trainers), before any model or data;
  - weights: every nn.Parameter and module buffer, each storage once (all models: policy,
    reference, reward model, value model);
  - gradients: the parameters' .grad;
  - optimizer state: every tensor in every optimizer's state;
  - other live tensors: the rest found alive then (a sampler's own weight copy, caches);
  - activations: the most bytes saved for one backward pass (saved-tensor hooks, parameter
    storages left out; autocast's bf16 weight copies are saved tensors, so they count here);
  - rest: peak RSS minus all of the above: allocator slack, freed-but-kept memory, transient
    buffers (logits chunks, temporaries) and whatever no tensor above accounts for.
The hooks cost time of their own (a Python call per module call and saved tensor): profiled runs
are for the shares, not for the throughput table.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from pathlib import Path

CATEGORIES = ("forward", "backward", "optimizer", "generation", "no-grad forward", "data", "other")
MEMORY = ("runtime", "weights", "gradients", "optimizer state", "activations", "other live tensors", "rest")


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory line of /proc/self/status (VmRSS now, VmHWM the peak so far), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class Breakdown:
    """Installs the hooks; `seconds` holds the exclusive time per category so far."""

    def __init__(self, tool: str):
        import importlib

        import torch

        for library in ("transformers", "accelerate", "peft", "trl" if tool == "trl" else "posttrain.trainers.common"):
            importlib.import_module(library)  # imported now, so that `runtime` counts them
        self.torch = torch
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.stack: list[str] = []
        self.last = time.perf_counter()
        self.module_depth = 0
        self._pushed_module = False  # whether the outermost module call in progress pushed a category
        self.runtime = rss_bytes()
        self.memory: dict[str, int] = {}
        self.saved: dict[int, int] = {}
        self.saved_peak = 0
        self.param_storages: set[int] = set()
        self.in_warmup = True
        self._install()

    # ------------------------------------------------------------ time
    def _switch(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.last
        self.last = now

    def push(self, category: str) -> None:
        self._switch()
        self.stack.append(category)

    def pop(self) -> None:
        self._switch()
        self.stack.pop()

    @contextmanager
    def timed(self, category: str):
        self.push(category)
        try:
            yield
        finally:
            self.pop()

    def snapshot(self) -> dict[str, float]:
        self._switch()
        return dict(self.seconds)

    def _install(self) -> None:
        torch = self.torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(module, args):
            self.module_depth += 1
            if self.module_depth == 1 and not self.stack:
                self.push("forward" if torch.is_grad_enabled() else "no-grad forward")
                self._pushed_module = True
            elif self.module_depth == 1:
                self._pushed_module = False

        def post(module, args, output):
            self.module_depth -= 1
            if self.module_depth == 0 and self._pushed_module:
                self.pop()

        register_module_forward_pre_hook(pre)
        register_module_forward_hook(post, always_call=True)

        def step_post(optimizer, args, kwargs):
            self.pop()
            if self.in_warmup:
                self._split_memory()
                self.last = time.perf_counter()  # the scan is charged to no category

        register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: self.push("optimizer"))
        register_optimizer_step_post_hook(step_post)

        backward = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            with self.timed("backward"):
                out = backward(*args, **kwargs)
            self.saved.clear()  # what this pass saved is freed; the next forward saves anew
            return out

        torch.autograd.backward = timed_backward
        clip = torch.nn.utils.clip_grad_norm_

        def timed_clip(*args, **kwargs):
            with self.timed("optimizer"):
                return clip(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = timed_clip

        def pack(t):
            if t.is_mkldnn:
                return t
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.param_storages and key not in self.saved:
                self.saved[key] = storage.nbytes()
                self.saved_peak = max(self.saved_peak, sum(self.saved.values()))
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        hooks.__enter__()  # for the whole process: every tensor saved for backward passes through pack

    # ------------------------------------------------------------ memory
    def _split_memory(self) -> None:
        torch = self.torch
        objects = gc.get_objects()
        modules = [o for o in objects if isinstance(o, torch.nn.Module)]
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        seen: set[int] = set()

        def total(tensors) -> int:
            n = 0
            for t in tensors:
                if t is None or t.device.type == "meta":
                    continue
                if t.is_mkldnn:  # oneDNN's pre-packed weights (posttrain's sampler): no storage to read
                    key, size = id(t), t.numel() * t.element_size()
                else:
                    key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key in seen or size == 0:
                    continue
                seen.add(key)
                n += size
            return n

        params = list({id(p): p for m in modules for p in m.parameters(recurse=False)}.values())
        buffers = [b for m in modules for b in m.buffers(recurse=False)]
        local = [getattr(p, "_local_tensor", p) for p in params]
        self.param_storages = {t.untyped_storage().data_ptr() for t in local}
        split = {"weights": total(local + buffers),
                 "gradients": total(getattr(p.grad, "_local_tensor", p.grad) for p in params),
                 "optimizer state": total(getattr(v, "_local_tensor", v) for o in optimizers for s in o.state.values()
                                          for v in s.values() if isinstance(v, torch.Tensor))}
        split["other live tensors"] = total(o for o in objects if isinstance(o, torch.Tensor))
        self.memory = split

    def memory_split(self, peak: int) -> dict[str, int]:
        split = {"runtime": self.runtime, **self.memory, "activations": self.saved_peak}
        split["rest"] = peak - sum(split.values())
        return {key: split.get(key, 0) for key in MEMORY}
