"""Sharded training (FSDP2): parameters, gradients and optimizer state split over the processes.

One function, `engine`, decides who shards, from the config and what accelerate set up:

  sharding=fsdp, accelerate's distributed type FSDP (GPUs, `accelerate launch` with an FSDP config)
      → "accelerate": its prepare applies FSDP2 (`fsdp_version: 2`), one unit per decoder layer;
  sharding=fsdp, a gloo group of CPU processes (torchrun, or accelerate launch on CPUs)
      → "torch": torch's own `fully_shard` here, per decoder layer and then the root. accelerate
        1.15 does not shard on CPUs: with an FSDP config each process joins the gloo group as
        plain multi-CPU and would train under DDP, or, without the group, alone;
  sharding=fsdp, one process
      → "one_process": nothing to shard, but checkpoints are written in the same distributed
        format, so a run can move between one process and several;
  sharding=none → "none": DDP (several processes) or one process, as before.

A run that asked to shard and did not, or did not ask and was launched to, stops with one line
(`engine`, `check_sharded`). Sharded checkpoints are torch distributed checkpoints (DCP): each
process writes its own part, and DCP reshards on load, which is what lets a checkpoint written by
N processes resume on M (the data position is a function of the step and the global batch alone,
see common.step_items). The final model is gathered into a full state dict on the main process
and saved as an ordinary `from_pretrained` folder.
"""

from __future__ import annotations

import copy
import math
import os
import random
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from posttrain.models.compile import compile_layers
from posttrain.models.compile import decoder_layers as _decoder_layers
from posttrain.models.load import cast_linear_weights

if TYPE_CHECKING:  # accelerate is imported where it is used: config validation reads SHARDING
    from accelerate import Accelerator

SHARDING = ("none", "fsdp")
"""Choices of the config's `sharding` field."""

MODEL_STATE = "sharded_state"
"""Folder of a sharded checkpoint holding the model and optimizer (DCP: one file per process)."""
SCHEDULER_STATE = "scheduler.pt"
RNG_STATE = "rng-{rank}.pt"

_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each model this process sharded → its structure before sharding, on the meta device (no
memory). A sharded module cannot be unsharded in place; the final save loads the gathered
weights into this copy on the main process and saves it as any model."""


def engine(cfg, accelerator: Accelerator) -> str:
    """"none", "accelerate", "torch" or "one_process" (module docstring); ValueError for a
    launch that would not do what the config asks."""
    from accelerate.utils import DistributedType

    asked = cfg.sharding == "fsdp"
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kind = accelerator.distributed_type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise ValueError(f"WORLD_SIZE={world} but accelerate joined {accelerator.num_processes} process(es) "
                         f"(distributed type {kind.value}): each process would train its own copy; launch with "
                         "torchrun or accelerate launch on a machine accelerate can group")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or kind == DistributedType.DEEPSPEED:
        raise ValueError("launched with an accelerate DeepSpeed config: posttrain does not train under DeepSpeed "
                         "(README \"Scaling out\"); shard with --sharding fsdp and configs/accelerate/fsdp.yaml")
    if launched and not asked:
        raise ValueError("launched with an accelerate FSDP config but sharding='none'; add --sharding fsdp "
                         "(or launch with configs/accelerate/ddp.yaml)")
    if kind == DistributedType.FSDP and not asked:
        raise ValueError("accelerate is set up for FSDP but sharding='none'; add --sharding fsdp")
    if not asked:
        return "none"
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError(f"sharding=fsdp needs fsdp_version: 2 in the accelerate config, got "
                             f"{accelerator.state.fsdp_plugin.fsdp_version}")
        return "accelerate"
    if kind == DistributedType.MULTI_CPU:
        return "torch"
    if kind == DistributedType.NO:
        return "one_process"
    raise ValueError(f"sharding=fsdp under accelerate's distributed type {kind.value}: on GPUs launch with "
                     "accelerate launch --config_file configs/accelerate/fsdp.yaml")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become one FSDP unit each: the decoder layers (models.compile.decoder_layers).
    ValueError when there is none: the whole model would be one unit, gathered whole in every
    forward, which shards nothing that matters."""
    return _decoder_layers(model, "sharding=fsdp")


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model`'s structure with every parameter on the meta device (tied parameters stay tied;
    buffers, small, are copied)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard_in_place(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """torch's fully_shard on each decoder layer, then on the root (which takes the rest: the
    embeddings, the final norm, a value head). Each unit is gathered only around its own use.

    With a compute dtype (bf16 autocast) each layer's weights are gathered already cast to it
    (FSDP2's MixedPrecisionPolicy), except the parameters of its non-Linear modules (RMSNorm
    weights), which form an fp32 unit of their own: autocast casts exactly the Linear weights, so
    the forward computes what autocast over whole fp32 weights computes, while gathered layers
    take half the memory and autocast no longer caches a bf16 copy of every weight for the step.
    Gradients are reduced and accumulated in fp32, as autocast's cast back to the fp32 master does.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for layer in decoder_layers(model):
        if compute_dtype is not None:
            kept = [m for m in layer.modules() if not isinstance(m, torch.nn.Linear)
                    and any(True for _ in m.parameters(recurse=False))]
            if kept:
                fully_shard(kept)
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                              cast_forward_inputs=False))
        else:
            fully_shard(layer)
    fully_shard(model)


def compute_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """bf16 when the run computes under bf16 autocast, else None (fp32 throughout)."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else None


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def check_sharded(model: torch.nn.Module, world: int) -> None:
    """ValueError unless every parameter is a DTensor (a shard) when world > 1."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    plain = sum(not isinstance(p, DTensor) for p in params)
    if world > 1 and plain:
        raise ValueError(f"sharding=fsdp: {plain} of {len(params)} parameters are not sharded over the "
                         f"{world} processes after preparing; refusing to train unsharded copies")


KEPT_UNTIL_EXIT: list = []
"""The prepared models (DDP wrappers) and accelerators of multi-process runs, kept until exit.
Freeing a DDP module right after the run's last collective deadlocked: its reducer destroyed
gloo's process group holding the GIL and joined a gloo thread that needed the GIL to free that
collective's tensors (gdb's stacks of two-process test ranks hung so until their timeout).
accelerate's `_models` holds the module it wrapped, not the DDP wrapper, so keeping the
accelerator alone left the wrapper to the trainer's frame (the RM two-process test still hung 1
run in 6). Kept here, they are freed at exit, long after, or never: `posttrain.cli.main` leaves
such a process by os._exit."""


def prepare(accelerator: Accelerator, cfg, model: torch.nn.Module, optimizer, scheduler):
    """`_prepare` (below), with a multi-process run's prepared model kept in KEPT_UNTIL_EXIT, and
    with cfg.compile its decoder layers compiled first (models.compile)."""
    if cfg.compile:
        # Compiled before any wrapper, as accelerate's own dynamo_backend does: DDP's hooks sit on
        # the parameters, which compiling leaves as they are.
        layers = compile_layers(model)
        accelerator.print(f"compile: {layers} decoder layers compiled at their first call (torch.compile, "
                          f"kernels cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
    prepared = _prepare(accelerator, cfg, model, optimizer, scheduler)
    if accelerator.num_processes > 1:
        KEPT_UNTIL_EXIT.append(prepared[0])
    return prepared


def _prepare(accelerator: Accelerator, cfg, model: torch.nn.Module, optimizer, scheduler):
    """accelerator.prepare(model, optimizer, scheduler), sharded as `engine` decides.

    On the "torch" path the model is sharded here, the optimizer's parameters are swapped for the
    shards by name (it holds no state yet), and accelerate prepares the optimizer and scheduler
    and wraps the model's forward in its autocast (bf16 over fp32 master weights, as on one
    process) without wrapping it in DDP (accelerate's evaluation_mode=True: "just applying mixed
    precision and torch.compile").
    """
    how = engine(cfg, accelerator)
    if how == "none":
        return accelerator.prepare(model, optimizer, scheduler)
    # Checked on one process too: its checkpoints are meant to resume on several.
    layers = decoder_layers(model)
    if how == "one_process":
        accelerator.print("sharding: one process holds the whole model; checkpoints are distributed checkpoints "
                          "that resume on several processes")
        return accelerator.prepare(model, optimizer, scheduler)
    skeleton = meta_copy(model)
    if how == "accelerate":
        plugin = accelerator.state.fsdp_plugin
        # accelerate reads layer classes from the prepared module's _no_split_modules; ours is a
        # wrapper (TokenLogprobs, RewardModel) that has none, so name the layers it wraps.
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = sorted({type(layer).__name__ for layer in layers})
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        names = {id(p): name for name, p in model.named_parameters()}
        shard_in_place(model, compute_dtype(accelerator))
        shards = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [shards[names[id(p)]] for p in group["params"]]
        model = accelerator.prepare_model(model, evaluation_mode=True)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    check_sharded(model, accelerator.num_processes)
    _SKELETONS[model] = skeleton
    gathers = ", Linear weights gathered in bf16" if how == "torch" and compute_dtype(accelerator) else ""
    accelerator.print(f"sharding: FSDP2 by {how}, {len(layers)} layer units + root over "
                      f"{accelerator.num_processes} processes{gathers}")
    return model, optimizer, scheduler


def prepare_frozen(accelerator: Accelerator, cfg, model: torch.nn.Module) -> None:
    """Ready a frozen model (DPO's and KTO's reference, PPO's and GRPO's reference) in place.

    A sharded run shards it: it is as large as the policy, so holding it whole on every process
    would undo most of the saving; it costs one gather per layer per reference forward. Otherwise,
    under bf16 autocast, its Linear weights are stored in bf16 (models.load.cast_linear_weights):
    the same log-probs bit for bit, in about half the memory, without autocast's per-call cast.
    """
    if engine(cfg, accelerator) in ("accelerate", "torch"):
        shard_in_place(model, compute_dtype(accelerator))
        check_sharded(model, accelerator.num_processes)
    elif compute_dtype(accelerator) is not None:
        cast_linear_weights(model, compute_dtype(accelerator))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or ±inf, or None; for a sharded model every process
    answers alike (a shard of another process is named "a parameter on another process")."""
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(local(p)).all()), None)
    if is_sharded(model):
        # On the parameters' device: NCCL reduces GPU tensors only.
        found = torch.tensor(float(bad is not None), device=next(model.parameters()).device)
        torch.distributed.all_reduce(found)
        if found.item() and bad is None:
            return "(a parameter on another process)"
    return bad


def eval_batches(items: list, batch_size: int, accelerator: Accelerator) -> list[tuple[list, bool]]:
    """This process's batches of `items` (interleaved over processes) and whether each counts.

    Every process gets the same number of batches: under FSDP each forward gathers parameters
    from every process, so a process with fewer batches would leave the others waiting. One
    that runs out repeats items[:1] in a batch that does not count (False).
    """
    world = accelerator.num_processes
    mine = items[accelerator.process_index::world]
    rounds = math.ceil(math.ceil(len(items) / world) / batch_size)
    batches = [mine[i * batch_size: (i + 1) * batch_size] for i in range(rounds)]
    return [(batch, True) if batch else (items[:1], False) for batch in batches]


def gathered(model: torch.nn.Module, *, everywhere: bool) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model (a collective: every process calls it): on every
    process, or (everywhere=False) on the main process only, the others getting {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def materialized(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new unsharded copy of the sharded `model` (its skeleton) holding the tensors of `full`."""
    skeleton = copy.deepcopy(_SKELETONS[model])
    # Tied parameters (embeddings and LM head) must stay one Parameter: each name sharing one
    # gets the Parameter made for the first name.
    made: dict[int, torch.nn.Parameter] = {}
    state = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) not in made:
            made[id(p)] = torch.nn.Parameter(full[name], requires_grad=p.requires_grad)
        state[name] = made[id(p)]
    buffers = {name for name, _ in skeleton.named_buffers()}
    state.update({name: tensor for name, tensor in full.items() if name in buffers})
    skeleton.load_state_dict(state, assign=True)
    return skeleton


def full_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The trained model, whole, to save: on every process call it together (a sharded model is
    gathered, a collective); the main process gets the model, the others None. An unsharded model
    is returned unwrapped, on every process."""
    if not is_sharded(model):
        return accelerator.unwrap_model(model)
    full = gathered(model, everywhere=False)
    return materialized(model, full) if accelerator.is_main_process else None


def whole_copy(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model whole on every process, for code that reads weights outside a forward pass (the
    sampler's inference copy): the unwrapped model itself when it is not sharded, else a
    per-process copy with the gathered weights, to refresh with `refresh` after each update."""
    if not is_sharded(model):
        return accelerator.unwrap_model(model)
    return materialized(model, gathered(model, everywhere=True))


def refresh(copy_: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy the sharded `model`'s current weights into its whole_copy (every process calls it);
    nothing to do when the model is not sharded (the copy is the model)."""
    if is_sharded(model):
        copy_.load_state_dict(gathered(model, everywhere=True))


def padded_share(items: list, accelerator: Accelerator) -> tuple[list, int]:
    """This process's interleaved share of `items`, padded with items[0] to the same length on
    every process, and how many at its front are real. For loops whose batch sizes decide how many
    forward passes follow (PPO's and GRPO's evaluation): under FSDP every process must run as many."""
    mine = items[accelerator.process_index::accelerator.num_processes]
    width = math.ceil(len(items) / accelerator.num_processes)
    return mine + items[:1] * (width - len(mine)), len(mine)


# ---------------------------------------------------------------- checkpoints


@contextmanager
def one_process_is_meant() -> Iterator[None]:
    """Silences DCP's warning that, without a process group, it assumes one process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def prepared(accelerator: Accelerator):
    """(model, optimizer, scheduler) as accelerate registered them: every trainer prepares
    exactly one of each, and save_state / load_state read the same lists."""
    if (len(accelerator._models), len(accelerator._optimizers), len(accelerator._schedulers)) != (1, 1, 1):
        raise ValueError(f"sharded checkpoint: expected one prepared model, optimizer and scheduler, got "
                         f"{len(accelerator._models)}, {len(accelerator._optimizers)}, {len(accelerator._schedulers)}")
    return accelerator._models[0], accelerator._optimizers[0].optimizer, accelerator._schedulers[0].scheduler


def save_state(accelerator: Accelerator, folder: Path) -> None:
    """Model and optimizer as a distributed checkpoint in folder/MODEL_STATE (each process writes
    its shards, the main process the metadata), the scheduler, and each process's RNG streams."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer, scheduler = prepared(accelerator)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with one_process_is_meant():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / MODEL_STATE)
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), folder / SCHEDULER_STATE)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               folder / RNG_STATE.format(rank=accelerator.process_index))


def load_state(accelerator: Accelerator, folder: Path, *, saved_world: int, step: int, seed: int) -> None:
    """Load what save_state wrote, resharded to this run's processes. With the same process count
    each process takes back its RNG streams; with another there is no stream to continue, so each
    is seeded from (seed, step, rank) and the run says so."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / MODEL_STATE / ".metadata").is_file():
        raise ValueError(f"--resume: {folder} holds no sharded state ({MODEL_STATE}/.metadata); it was not "
                         "written with sharding=fsdp")
    model, optimizer, scheduler = prepared(accelerator)
    # get_state_dict creates the optimizer's (empty) state, which DCP then fills in place.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with one_process_is_meant():
        dcp.load(state, checkpoint_id=folder / MODEL_STATE)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_STATE, weights_only=True))
    if saved_world == accelerator.num_processes:
        rng = torch.load(folder / RNG_STATE.format(rank=accelerator.process_index), weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        return
    rank_seed = seed + 1_000_003 * step + accelerator.process_index
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    accelerator.print(f"resumed on {accelerator.num_processes} process(es) a checkpoint of {saved_world}: model "
                      "and optimizer resharded; random streams seeded from (seed, step, rank)")
