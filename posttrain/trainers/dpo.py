"""Direct preference optimisation (Rafailov et al. 2023) and its variants, from preference pairs.

The loss is picked once from DPO_LOSSES[cfg.loss]; its record says whether it needs a
reference model and whether it takes summed or per-token mean log-probs. The reference is
picked once too (posttrain.models.reference): a frozen copy, the LoRA policy with adapters
off, log-probs precomputed before training, or none for reference-free losses.

Stages of one optimizer step:
  1. take this step's global batch of pairs (a function of step and seed only);
  2. count the pairs of the whole global batch, across micro-batches and processes;
  3. per micro-batch: reference log-probs of chosen and rejected (no gradient);
  4. policy log-probs of chosen and rejected in one forward pass (prefix-shared by default);
  5. loss per pair, Σ / that count, backward;
  6. clip, step AdamW and the schedule; log, evaluate and checkpoint on their cadences.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import DPOConfig
from posttrain.data import TokenizedPair, load_preference_pairs
from posttrain.losses.dpo import DPO_LOSSES, DPOLoss
from posttrain.models import load_causal_lm, load_tokenizer, resolve_model_path
from posttrain.models.cache import cache_root
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.lora import apply_lora, save_model
from posttrain.models.value import disable_dropout
from posttrain.models.pairs import PairBatch, collate_pairs, sequence_logps
from posttrain.models.reference import (AdaptersOff, FrozenCopy, Precomputed, load_cached_logps, reference_cache_key,
                                        reference_mode, save_cached_logps)
from posttrain.ops import aggregate
from posttrain.trainers.common import (NonFiniteGuard, RunLog, Throughput, batch_records, build_optimizer,
                                       build_scheduler, global_sum, make_accelerator, micro_batches, optimizer_step,
                                       seed_everything, step_items, total_steps, weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.sharding import eval_batches, full_model, prepare, prepare_frozen


@dataclass
class PairSet:
    """Tokenised pairs and, for a precomputed reference, their summed reference log-probs
    ref_logps [n,2] (chosen, rejected)."""

    pairs: list[TokenizedPair]
    ref_logps: torch.Tensor | None = None

    def batch(self, indices: list[int], pad_id: int, prefix_sharing: bool) -> PairBatch:
        ref = None if self.ref_logps is None else self.ref_logps[indices]
        return collate_pairs([self.pairs[i] for i in indices], pad_id, prefix_sharing=prefix_sharing, ref_logps=ref)


def load_pairs(cfg: DPOConfig, source: str, tokenizer, print_fn) -> PairSet:
    """The same records, validation and errors as the reward model: pairs, or scored lists
    expanded into pairs."""
    pairs, report = load_preference_pairs(source, tokenizer, max_length=cfg.max_length, pairing=cfg.pairing,
                                          min_score_gap=cfg.min_score_gap, overlong=cfg.overlong,
                                          skip_invalid=cfg.skip_invalid)
    print_fn(report.summary())
    return PairSet(pairs)


def pair_losses(spec: DPOLoss, cfg: DPOConfig, batch: PairBatch, policy_logps, ref_logps):
    """Loss per pair [B] and detached statistics summed over the B pairs.

    policy_logps, ref_logps: (chosen [B], rejected [B]) summed log-probs; ref_logps is None
    for reference-free losses. Length-normalised losses get per-token means (sum / length).
    `logps/*` report the log-probs the loss was given.
    """
    device = policy_logps[0].device
    lengths = (batch.chosen_lengths.to(device), batch.rejected_lengths.to(device))

    def fed(logps):
        if logps is None:
            return None, None
        return tuple(lp / n for lp, n in zip(logps, lengths)) if spec.length_normalized else logps

    (pc, pr), (rc, rr) = fed(policy_logps), fed(ref_logps)
    hyper = {name: getattr(cfg, name) for name in spec.hyperparameters}
    loss, chosen_rewards, rejected_rewards = spec.fn(pc, pr, rc, rr, beta=cfg.beta, **hyper)
    stats = {"loss": loss.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
             "rewards/rejected": rejected_rewards.sum(),
             "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
             "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
             "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
    return loss, {k: float(v) for k, v in stats.items()}


STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
         "logps/rejected")
"""What pair_losses reports, in the order every process sums them (a process with no pairs sends zeros)."""


def add_to(total: dict[str, float], stats: dict[str, float]) -> None:
    for key, value in stats.items():
        total[key] += value


def global_means(accelerator, sums: dict[str, float], count: float) -> dict[str, float]:
    """Per-pair means of statistics summed over this process's pairs, over all processes."""
    totals = accelerator.reduce(torch.tensor(list(sums.values()), dtype=torch.float64,
                                             device=accelerator.device), reduction="sum")
    return {key: value / max(count, 1) for key, value in zip(sums, totals.tolist())}


@torch.no_grad()
def evaluate(policy, reference, data: PairSet, spec: DPOLoss, cfg: DPOConfig, accelerator,
             pad_id: int) -> dict[str, float]:
    """The training statistics on held-out pairs, each process taking an interleaved share."""
    policy.eval()
    sums = dict.fromkeys(STATS, 0.0)
    for indices, counts in eval_batches(list(range(len(data.pairs))), cfg.batch_size, accelerator):
        batch = data.batch(indices, pad_id, cfg.prefix_sharing)
        ref_logps = None if reference is None else reference.logps(batch)
        _, stats = pair_losses(spec, cfg, batch, sequence_logps(policy, batch, accelerator.device), ref_logps)
        if counts:
            add_to(sums, stats)
    policy.train()
    means = global_means(accelerator, sums, len(data.pairs))
    return {f"eval/{key}": value for key, value in means.items()}


@torch.no_grad()
def precompute_reference(model, data: PairSet, cfg: DPOConfig, accelerator, pad_id: int) -> torch.Tensor:
    """Summed reference log-probs [n,2] of every pair, from the cache or computed now.

    Each process scores an interleaved share and a sum over processes assembles the table,
    so N processes do 1/N of the work each. The key (reference_cache_key) covers the model,
    the tokenised pairs and the precision.
    """
    n = len(data.pairs)
    key = reference_cache_key(resolve_model_path(cfg.model), data.pairs, accelerator.mixed_precision)
    path = cache_root() / "reference-logps" / f"{key}.safetensors"
    table = load_cached_logps(path, n)
    if global_sum(accelerator, table is None) == 0:
        accelerator.print(f"reference log-probs of {n} pairs loaded from {path}")
        return table
    scorer = TokenLogprobs(model).to(accelerator.device).eval()
    table = torch.zeros(n, 2, dtype=torch.float32, device=accelerator.device)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    with accelerator.autocast():
        for i in range(0, len(mine), cfg.batch_size):
            indices = mine[i: i + cfg.batch_size]
            chosen, rejected = sequence_logps(scorer, data.batch(indices, pad_id, cfg.prefix_sharing),
                                              accelerator.device)
            table[indices] = torch.stack([chosen, rejected], dim=-1)
    table = accelerator.reduce(table, reduction="sum").cpu()
    if accelerator.is_main_process:
        save_cached_logps(path, table)
    accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs of {n} pairs computed and cached in {path}")
    return table


def train(cfg: DPOConfig) -> Path:
    """Run DPO (or the configured variant); returns the folder holding the final model."""
    spec = DPO_LOSSES[cfg.loss]
    mode = reference_mode(spec.needs_reference, precompute=cfg.precompute_ref, lora=cfg.lora_r > 0)
    if cfg.precompute_ref and mode == "none":
        raise ValueError(f"config: precompute_ref=True but loss={cfg.loss!r} uses no reference model")
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    # Data is validated before the output folder is touched: a bad record leaves nothing behind.
    train_set = load_pairs(cfg, cfg.data, tokenizer, accelerator.print)
    eval_set = load_pairs(cfg, cfg.eval_data, tokenizer, accelerator.print) if cfg.eval_data else None
    fingerprint = check_output_dir(cfg, accelerator.num_processes)

    model = load_causal_lm(cfg.model)
    # The reference is the starting model, so it is taken before anything changes the policy.
    reference = None
    if mode == "frozen_copy":
        reference = FrozenCopy(model, accelerator.device, accelerator.autocast)
        prepare_frozen(accelerator, cfg, reference.model)
    if mode == "precomputed":
        for data in filter(None, (train_set, eval_set)):
            data.ref_logps = precompute_reference(model, data, cfg, accelerator, pad_id)
        reference = Precomputed(accelerator.device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    # Policy and reference log-probs are compared: the policy's passes must not drop out either.
    disable_dropout(model)
    policy = TokenLogprobs(model).train()
    world = accelerator.num_processes
    steps = total_steps(cfg, len(train_set.pairs), world, accelerator.print, "pairs")
    optimizer = build_optimizer(policy, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    policy, optimizer, scheduler = prepare(accelerator, cfg, policy, optimizer, scheduler)
    if mode == "adapters_off":
        reference = AdaptersOff(accelerator.unwrap_model(policy), accelerator.device, accelerator.autocast)
    accelerator.print(f"loss {cfg.loss}, reference: {mode}, prefix sharing: {cfg.prefix_sharing}")
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = resume_from_checkpoint(accelerator, cfg)["step"] if cfg.resume else 0

    guard = NonFiniteGuard(cfg, "dpo")
    log = RunLog(accelerator, cfg, steps, start, "dpo")
    speed = Throughput()
    stop = StopRequest(accelerator, cfg, "dpo", optimizer)
    with stop.installed():
        for step in range(start, steps):
            # 1. This step's pairs, and this process's micro-batches of them.
            items = step_items(step, len(train_set.pairs), cfg.global_batch(world), cfg.seed)
            mine = micro_batches(items, rank=accelerator.process_index, world_size=world,
                                 batch_size=cfg.batch_size)
            batches = [train_set.batch(mb, pad_id, cfg.prefix_sharing) for mb in mine]
            # 2. One normaliser for the whole global batch, as SFT's token count: the pair
            #    count, over processes; DDP averages gradients over processes, hence / world.
            n_pairs = global_sum(accelerator, sum(b.pairs for b in batches))
            sums = dict.fromkeys(STATS, 0.0)
            with weights_cast_once(accelerator, policy):
                for i, batch in enumerate(batches):
                    last = i == len(batches) - 1
                    with nullcontext() if last else accelerator.no_sync(policy):
                        # 3. π_ref log-probs, no gradient (None for reference-free losses).
                        ref_logps = None if reference is None else reference.logps(batch)
                        # 4. π_θ log-probs of chosen and rejected, one forward pass.
                        policy_logps = sequence_logps(policy, batch, accelerator.device)
                        # 5. Per-pair loss; Σ over pairs / global pair count.
                        loss, stats = pair_losses(spec, cfg, batch, policy_logps, ref_logps)
                        every_pair = torch.ones_like(loss, dtype=torch.bool)[:, None]
                        accelerator.backward(aggregate(loss[:, None], every_pair, mode="token",
                                                       normalizer=n_pairs / world))
                    add_to(sums, stats)
                    speed.add(batch.pairs)
            # 6. Clip, step, schedule.
            grad_norm = optimizer_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm, guard,
                                       step=step + 1, batch=batch_records(train_set.pairs, items, cfg.data))

            done = step + 1
            stop.step_done(done)
            if done % cfg.logging_steps == 0 or done == steps:
                means = global_means(accelerator, sums, n_pairs)
                train_loss = means.pop("loss")
                rate = global_sum(accelerator, speed.rate())
                log.log(done, {"loss/train": train_loss, **means, "perf/pairs_per_s": rate,
                               "optim/lr": scheduler.get_last_lr()[0], "optim/grad_norm": grad_norm,
                               **guard.metrics(),
                               "train/epoch": done * cfg.global_batch(world) / len(train_set.pairs)})
                log.progress(0, {"loss": f"{train_loss:.4f}", "acc": f"{means['rewards/accuracy']:.2f}",
                                 "pairs/s": f"{rate:.1f}"})
            log.progress(1, {})
            if eval_set and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps:
                log.log(done, evaluate(policy, reference, eval_set, spec, cfg, accelerator, pad_id))
            if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
                save_checkpoint(accelerator, cfg, done)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, "dpo", stop.signum)

    if eval_set:
        metrics = evaluate(policy, reference, eval_set, spec, cfg, accelerator, pad_id)
        log.log(steps, metrics)
        accelerator.print(f"eval/loss {metrics['eval/loss']:.4f}, "
                          f"eval/rewards/accuracy {metrics['eval/rewards/accuracy']:.3f}")

    guard.check_weights(policy)
    final = full_model(accelerator, policy)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        save_model(final.model, tokenizer, out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "model", step=steps, command="dpo")
