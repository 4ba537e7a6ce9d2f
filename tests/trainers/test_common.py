"""Helpers every trainer shares: weights_cast_once."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models.logprobs import TokenLogprobs
from posttrain.trainers.common import weights_cast_once

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; these tests pick their own mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class WeightCasts(TorchDispatchMode):
    """Counts the casts of the Linear layers' weights (autocast's, to bf16)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.weights:
            self.count += 1
        return func(*args, **kwargs)


def loss_of(policy, ids: torch.Tensor) -> torch.Tensor:
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, 0] = False
    return -policy(ids, None, torch.arange(ids.shape[1]).expand_as(ids), target).sum()


def run_step(accelerator, policy, batches, *, once: bool) -> tuple[list[torch.Tensor], list[int]]:
    """One accumulated step's gradients, and the weight casts each micro-batch's forward made."""
    casts = []
    with weights_cast_once(accelerator, policy) if once else torch.enable_grad():
        for ids in batches:
            with WeightCasts(policy) as counter:
                loss = loss_of(policy, ids)
            casts.append(counter.count)
            accelerator.backward(loss)
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    return grads, casts


@pytest.mark.parametrize("checkpointing", [False, True])
def test_later_micro_batches_reuse_the_first_ones_casts_with_the_same_gradients(tiny_model_and_tokenizer,
                                                                                checkpointing):
    model, _ = tiny_model_and_tokenizer
    if checkpointing:  # the backward recomputes each layer's forward, under the region too
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    policy = accelerator.prepare(TokenLogprobs(model.train()))
    # The decoder's Linear layers; the tied head (weight = the embedding) is cast by the chunked head itself.
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.model.modules())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 12), generator=generator) for _ in range(3)]
    plain, plain_casts = run_step(accelerator, policy, batches, once=False)
    once, once_casts = run_step(accelerator, policy, batches, once=True)
    head_casts = plain_casts[0] - layers
    assert head_casts in (1, 2) and plain_casts == [layers + head_casts] * 3
    assert once_casts == [layers + head_casts, head_casts, head_casts]
    assert all(torch.equal(a, b) for a, b in zip(plain, once))
    # The casts end with the region: after an optimizer step the next one casts the new weights.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    again, again_casts = run_step(accelerator, policy, batches, once=True)
    reference, _ = run_step(accelerator, policy, batches, once=False)
    assert again_casts == once_casts
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
    assert not all(torch.equal(a, b) for a, b in zip(again, once))


def test_without_autocast_nothing_changes(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    policy = accelerator.prepare(TokenLogprobs(model.train()))
    with weights_cast_once(accelerator, policy):
        assert not torch.is_autocast_enabled("cpu")
        with WeightCasts(policy) as counter:
            loss_of(policy, torch.randint(0, 100, (1, 8)))
    assert counter.count == 0


def test_a_global_batch_larger_than_the_data_is_said_not_hidden():
    from posttrain.config import SFTConfig
    from posttrain.trainers.common import total_steps

    said = []
    cfg = SFTConfig(data="d.jsonl", output_dir="o", batch_size=1, grad_accum=8)
    assert total_steps(cfg, 3, 1, said.append, "examples") == 1
    assert said == ["note: a step takes 8 examples (batch_size 1 × grad_accum 8 × 1 process), more than the 3 "
                    "loaded: each step repeats some of them"]
    said.clear()
    assert total_steps(cfg, 8, 1, said.append, "examples") == 1 and said == []
    assert total_steps(cfg, 20, 2, said.append, "examples") == 2 and said == []  # 16 a step over 2 processes
    assert total_steps(cfg, 15, 2, said.append, "examples") == 1 and "× 2 processes), more than the 15" in said[0]


@pytest.mark.parametrize("config_name", ["GRPOConfig", "RLOOConfig", "PPOConfig"])
def test_a_rollout_batch_larger_than_the_prompts_is_said_not_hidden(config_name):
    import posttrain.config as config
    from posttrain.trainers.common import rollout_iterations

    said = []
    cfg = getattr(config, config_name)(data="p.jsonl", output_dir="o", rollout_batch_size=8, epochs=2)
    assert rollout_iterations(cfg, 3, said.append) == 1  # ⌈2 · 3 / 8⌉
    assert said == ["note: an iteration takes 8 prompts (rollout_batch_size), more than the 3 loaded: "
                    "each iteration repeats some of them"]
    said.clear()
    assert rollout_iterations(cfg, 8, said.append) == 2 and said == []
    cfg.max_steps = 5
    assert rollout_iterations(cfg, 20, said.append) == 5 and said == []


def test_an_error_after_the_next_update_began_writes_no_checkpoint(tmp_path, capsys):
    # Between GRPO's or PPO's minibatch updates the weights are of no step: saving them under the
    # last completed step would make --resume train part of a step twice.
    from accelerate import Accelerator

    from posttrain.config import SFTConfig
    from posttrain.trainers.stopping import StopRequest

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = SFTConfig(data="d.jsonl", output_dir=str(tmp_path / "run"))

    def update():
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()

    stop = StopRequest(Accelerator(cpu=True), cfg, "grpo", optimizer)
    with pytest.raises(RuntimeError, match="minibatch 2"):
        with stop.installed():
            update()
            stop.step_done(1)
            update()                              # the next step's first minibatch
            raise RuntimeError("minibatch 2 failed")
    assert "the run failed while updating the weights after step 1: no checkpoint of it is written" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # With no step done since the start, there is nothing to keep either.
    with pytest.raises(RuntimeError):
        with StopRequest(Accelerator(cpu=True), cfg, "grpo", optimizer).installed():
            raise RuntimeError("at once")
    assert capsys.readouterr().err == "" and not (tmp_path / "run").exists()


def test_the_progress_bar_keeps_the_logged_figures_and_draws_once_a_step(tmp_path, capsys):
    from accelerate import Accelerator

    from posttrain.config import SFTConfig
    from posttrain.trainers.common import RunLog

    log = RunLog(Accelerator(cpu=True), SFTConfig(data="d", output_dir=str(tmp_path)), 4, 0, "sft")
    log.bar.mininterval = 0   # draw at every call that may draw
    log.progress(0, {"loss": "0.5000"})
    log.progress(1, {})
    log.progress(1, {})
    log.close()
    drawn = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert log.bar.n == 2 and "loss=0.5000" in log.bar.postfix
    assert [line.split("|")[2].split()[0] for line in drawn] == ["0/4", "1/4", "2/4", "2/4"], drawn  # and close's
