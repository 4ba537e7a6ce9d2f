"""KTO (Ethayarajh et al. 2024) from unpaired thumbs-up / thumbs-down feedback.

Each example is a prompt, one completion and a label, desirable or undesirable; a preference
pair counts as one of each. The loss (posttrain.losses.kto) compares each example's implicit
reward with a reference point z₀, the policy's KL from the reference, estimated on mismatched
prompt–completion pairs: as in TRL, the k-th example of a batch is also scored with the
completion of example k − 1 (the first with the last one's). The reference is a frozen copy of
the starting model, or with LoRA the policy with its adapters off (posttrain.models.reference).

z₀ is estimated over the whole global batch, every micro-batch of every process, before any
loss is computed, so gradient accumulation and N processes give the update of one big batch
(TRL estimates it per micro-batch and averages over processes). It carries no gradient, so the
policy's mismatched log-probs come from a forward pass without one.

Stages of one optimizer step:
  1. take this step's global batch of examples, each with the completion it is mismatched with;
  2. count the examples of the whole global batch, across micro-batches and processes;
  3. per micro-batch, no gradient: log π_θ of the mismatched completions, log π_ref of the own
     and the mismatched ones (one prefix-shared row per example);
  4. z₀ from the mismatched log-probs of the whole global batch;
  5. per micro-batch: log π_θ of the own completions, loss per example, Σ / that count, backward;
  6. clip, step AdamW and the schedule; log, evaluate and checkpoint on their cadences.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from posttrain.config import KTOConfig
from posttrain.data import Batch, TokenizedCompletion, TokenizedPair, load_labelled_completions, pad_batch
from posttrain.losses.kto import kto_loss, kto_reference_point
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.logprobs import TokenLogprobs
from posttrain.models.lora import apply_lora, save_model
from posttrain.models.value import disable_dropout
from posttrain.models.pairs import PairBatch, collate_pairs, sequence_logps
from posttrain.models.reference import AdaptersOff, FrozenCopy, reference_mode
from posttrain.ops import aggregate, masked_sum
from posttrain.trainers.common import (NonFiniteGuard, RunLog, Throughput, batch_records, build_optimizer,
                                       build_scheduler, global_sum, make_accelerator, micro_batches, optimizer_step,
                                       seed_everything, step_items, total_steps, weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.sharding import eval_batches, full_model, prepare, prepare_frozen


@dataclass
class KTOBatch:
    """B examples as model inputs.

    own: [B,T] rows prompt + the example's own completion (loss_mask on the completion), for
    the policy's pass with gradient. both: a prefix-shared PairBatch holding each example's own
    completion as "chosen" and its mismatched completion as "rejected", for the passes without
    one (the prompt is computed once). labels: [B] bool, True = desirable.
    """

    own: Batch
    both: PairBatch
    labels: torch.Tensor


@dataclass
class ExampleSet:
    """Tokenised labelled completions, and the max_length that mismatched rows are cut to."""

    examples: list[TokenizedCompletion]
    max_length: int

    def batch(self, indices: list[tuple[int, int]], pad_id: int) -> KTOBatch:
        """indices: (example, example whose completion it is mismatched with), one per row."""
        rows = []
        for i, j in indices:
            example = self.examples[i]
            # Loading left every prompt at most max_length − 1 tokens, so one token at least fits.
            mismatched = self.examples[j].completion_ids[: self.max_length - len(example.prompt_ids)]
            rows.append(TokenizedPair(example.prompt_ids, example.completion_ids, mismatched, None,
                                      example.source_index))
        own = pad_batch([row.examples()[0] for row in rows], pad_id)
        labels = torch.tensor([self.examples[i].label for i, _ in indices], dtype=torch.bool)
        return KTOBatch(own, collate_pairs(rows, pad_id, prefix_sharing=True), labels)


def with_mismatched(items: list[int]) -> list[tuple[int, int]]:
    """Each item with the one before it, the first with the last: TRL's rotation of completions
    by +1 within a batch, (x₁, y_n), (x₂, y₁), …, (x_n, y_{n−1})."""
    return list(zip(items, items[-1:] + items[:-1]))


def load_examples(cfg: KTOConfig, source: str, tokenizer, print_fn) -> ExampleSet:
    examples, report = load_labelled_completions(source, tokenizer, max_length=cfg.max_length, pairing=cfg.pairing,
                                                 min_score_gap=cfg.min_score_gap, overlong=cfg.overlong,
                                                 skip_invalid=cfg.skip_invalid)
    print_fn(report.summary())
    return ExampleSet(examples, cfg.max_length)


def completion_logps(model, batch: Batch, device) -> torch.Tensor:
    """Summed log π of each row's completion, [B] float32 (model: a TokenLogprobs)."""
    mask = batch.loss_mask.to(device)
    per_token = model(batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device), mask)
    return masked_sum(per_token, mask, -1)


@torch.no_grad()
def logps_without_grad(policy, reference, batch: KTOBatch, device):
    """Stage 3: (log π_θ own [B], log π_θ mismatched [B], log π_ref own [B], log π_ref mismatched [B])."""
    return *sequence_logps(policy, batch.both, device), *reference.logps(batch.both)


def example_stats(loss, stats: dict, policy_logps, labels) -> dict[str, float]:
    """Sums over a micro-batch's examples, and its desirable / undesirable counts."""
    logps = policy_logps.detach()
    sums = {"loss": loss.detach().sum(), "rewards/chosen": stats["rewards/chosen"].sum(),
            "rewards/rejected": stats["rewards/rejected"].sum(), "logps/chosen": logps[labels].sum(),
            "logps/rejected": logps[~labels].sum(), "count/chosen": labels.sum(), "count/rejected": (~labels).sum()}
    return {key: float(value) for key, value in sums.items()}


def global_means(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Means over all processes: the loss per example, */chosen per desirable example and
    */rejected per undesirable one; a side the batch has no example of is left out, as in TRL."""
    reduced = accelerator.reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=accelerator.device),
                                 reduction="sum")
    totals = dict(zip(sums, reduced.tolist()))
    counts = {"chosen": totals.pop("count/chosen"), "rejected": totals.pop("count/rejected")}
    means = {"loss": totals.pop("loss") / max(sum(counts.values()), 1)}
    means.update({key: value / counts[key.split("/")[1]] for key, value in totals.items() if counts[key.split("/")[1]]})
    if all(counts.values()):
        means["rewards/margin"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def add_to(total: dict[str, float], stats: dict[str, float]) -> None:
    for key, value in stats.items():
        total[key] = total.get(key, 0.0) + value


@torch.no_grad()
def evaluate(policy, reference, data: ExampleSet, cfg: KTOConfig, accelerator, pad_id: int) -> dict[str, float]:
    """The training statistics on held-out examples, z₀ estimated on the whole held-out set (each
    example mismatched with the previous one's completion); each process takes an interleaved share."""
    policy.eval()
    device = accelerator.device
    parts = defaultdict(list)
    for items, counts in eval_batches(with_mismatched(list(range(len(data.examples)))), cfg.batch_size, accelerator):
        batch = data.batch(items, pad_id)
        values = (*logps_without_grad(policy, reference, batch, device), batch.labels.to(device))
        if counts:
            for name, value in zip(("own", "kl", "ref_own", "ref_kl", "labels"), values):
                parts[name].append(value)
    policy.train()

    def joined(name: str, dtype=torch.float32) -> torch.Tensor:  # a process may hold no held-out example
        return torch.cat(parts[name]) if parts[name] else torch.zeros(0, dtype=dtype, device=device)

    own, kl, ref_own, ref_kl = (joined(name) for name in ("own", "kl", "ref_own", "ref_kl"))
    labels = joined("labels", torch.bool)
    z0 = kto_reference_point(kl, ref_kl, reduce_sum=partial(accelerator.reduce, reduction="sum"))
    loss, stats = kto_loss(own, ref_own, labels, z0, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight)
    means = {**global_means(accelerator, example_stats(loss, stats, own, labels)), "kl/z0": float(z0)}
    return {f"eval/{key}": value for key, value in means.items()}


def balance(cfg: KTOConfig, data: ExampleSet) -> str:
    """The desirable / undesirable counts against the paper's advice on weights, λ_D·n_D / (λ_U·n_U)
    in [1, 4/3] (which TRL 1.16 also checks, with a warning)."""
    n_good = sum(example.label for example in data.examples)
    n_bad = len(data.examples) - n_good
    if not n_good or not n_bad:
        # With one kind only the loss only pushes all rewards one way past z₀; the paper's
        # imbalance advice (weights that balance λ·n) cannot be met at all.
        raise ValueError(f"{cfg.data}: {n_good} desirable and {n_bad} undesirable examples; KTO needs some of "
                         "each (labels true and false)")
    ratio = cfg.desirable_weight * n_good / (cfg.undesirable_weight * n_bad)
    return (f"{n_good} desirable and {n_bad} undesirable examples: λ_D·n_D / (λ_U·n_U) = {ratio:.2f} "
            "(the KTO paper advises 1 to 4/3)")


def train(cfg: KTOConfig) -> Path:
    """Run KTO; returns the folder holding the final model."""
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    if cfg.global_batch(world) < 2:
        raise ValueError(f"config: batch_size × grad_accum × processes = {cfg.global_batch(world)} must be ≥ 2: "
                         "z₀ scores every example's prompt with another example's completion")
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    # Data is validated before the output folder is touched: a bad record leaves nothing behind.
    train_set = load_examples(cfg, cfg.data, tokenizer, accelerator.print)
    eval_set = load_examples(cfg, cfg.eval_data, tokenizer, accelerator.print) if cfg.eval_data else None
    accelerator.print(balance(cfg, train_set))
    fingerprint = check_output_dir(cfg, accelerator.num_processes)

    model = load_causal_lm(cfg.model)
    mode = reference_mode(True, precompute=False, lora=cfg.lora_r > 0)
    # The reference is the starting model, so it is taken before anything changes the policy.
    reference = FrozenCopy(model, accelerator.device, accelerator.autocast) if mode == "frozen_copy" else None
    if reference is not None:
        prepare_frozen(accelerator, cfg, reference.model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    # Policy and reference log-probs are compared: the policy's passes must not drop out either.
    disable_dropout(model)
    policy = TokenLogprobs(model).train()
    steps = total_steps(cfg, len(train_set.examples), world, accelerator.print, "examples")
    optimizer = build_optimizer(policy, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    policy, optimizer, scheduler = prepare(accelerator, cfg, policy, optimizer, scheduler)
    if mode == "adapters_off":
        reference = AdaptersOff(accelerator.unwrap_model(policy), accelerator.device, accelerator.autocast)
    accelerator.print(f"reference: {mode}")
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = resume_from_checkpoint(accelerator, cfg)["step"] if cfg.resume else 0
    device, all_reduce = accelerator.device, partial(accelerator.reduce, reduction="sum")
    weights = dict(beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)

    guard = NonFiniteGuard(cfg, "kto")
    log = RunLog(accelerator, cfg, steps, start, "kto")
    speed = Throughput()
    stop = StopRequest(accelerator, cfg, "kto", optimizer)
    with stop.installed():
        for step in range(start, steps):
            # 1. This step's examples, each with its mismatched partner, and this process's micro-batches.
            items = with_mismatched(step_items(step, len(train_set.examples), cfg.global_batch(world), cfg.seed))
            mine = micro_batches(items, rank=accelerator.process_index, world_size=world, batch_size=cfg.batch_size)
            batches = [train_set.batch(mb, pad_id) for mb in mine]
            # 2. One normaliser for the whole global batch, the example count over processes; DDP
            #    averages gradients over processes, hence / world.
            n_examples = global_sum(accelerator, sum(len(b.labels) for b in batches))
            # 3. Log-probs without gradient: π_θ on mismatched completions, π_ref on both kinds.
            fixed = [logps_without_grad(policy, reference, b, device)[1:] for b in batches]
            # 4. z₀ over the whole global batch (detached, clamped at 0).
            z0 = kto_reference_point(torch.cat([kl for kl, _, _ in fixed]), torch.cat([kl for _, _, kl in fixed]),
                                     reduce_sum=all_reduce)
            sums: dict[str, float] = {}
            with weights_cast_once(accelerator, policy):
                for i, (batch, (_, ref_own, _)) in enumerate(zip(batches, fixed)):
                    last = i == len(batches) - 1
                    with nullcontext() if last else accelerator.no_sync(policy):
                        # 5. π_θ log-probs of the own completions; loss per example; Σ / global count.
                        policy_logps = completion_logps(policy, batch.own, device)
                        labels = batch.labels.to(device)
                        loss, stats = kto_loss(policy_logps, ref_own, labels, z0, **weights)
                        every_example = torch.ones_like(loss, dtype=torch.bool)[:, None]
                        accelerator.backward(aggregate(loss[:, None], every_example, mode="token",
                                                       normalizer=n_examples / world))
                    add_to(sums, example_stats(loss, stats, policy_logps, labels))
                    speed.add(len(labels))
            # 6. Clip, step, schedule.
            grad_norm = optimizer_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm, guard,
                                       step=step + 1,
                                       batch=batch_records(train_set.examples, [i for i, _ in items], cfg.data))

            done = step + 1
            stop.step_done(done)
            if done % cfg.logging_steps == 0 or done == steps:
                means = global_means(accelerator, sums)
                train_loss = means.pop("loss")
                rate = global_sum(accelerator, speed.rate())
                log.log(done, {"loss/train": train_loss, **means, "kl/z0": float(z0), "perf/examples_per_s": rate,
                               "optim/lr": scheduler.get_last_lr()[0], "optim/grad_norm": grad_norm,
                               **guard.metrics(),
                               "train/epoch": done * cfg.global_batch(world) / len(train_set.examples)})
                log.progress(0, {"loss": f"{train_loss:.4f}", "z0": f"{float(z0):.3f}", "ex/s": f"{rate:.1f}"})
            log.progress(1, {})
            if eval_set and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps:
                log.log(done, evaluate(policy, reference, eval_set, cfg, accelerator, pad_id))
            if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
                save_checkpoint(accelerator, cfg, done)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, "kto", stop.signum)

    if eval_set:
        metrics = evaluate(policy, reference, eval_set, cfg, accelerator, pad_id)
        log.log(steps, metrics)
        accelerator.print(f"eval/loss {metrics['eval/loss']:.4f}, eval/kl/z0 {metrics['eval/kl/z0']:.4f}")

    guard.check_weights(policy)
    final = full_model(accelerator, policy)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        save_model(final.model, tokenizer, out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "model", step=steps, command="kto")
