"""Reward model (RM): a scalar head on the pretrained LM, trained with the Bradley–Terry loss.

L = −E log σ(r(x, o_w) − r(x, o_l) − m)  (Ouyang et al. 2022, Eq. 1; margin m: Touvron et
al. 2023, Eq. 2), plus the optional reward-centring term of `bradley_terry_loss`.

Stages of one optimizer step:
  1. take this step's global batch of pairs (a function of step and seed only);
  2. count the pairs of the whole global batch, across micro-batches and processes;
  3. per micro-batch: chosen and rejected rows in one padded batch and one forward pass,
     rewards split into halves, loss = Σ per-pair Bradley–Terry loss / that count;
  4. clip, step AdamW and the schedule; log, evaluate and checkpoint on their cadences.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain.config import RMConfig
from posttrain.data import TokenizedPair, load_preference_pairs, pad_batch
from posttrain.losses import bradley_terry_loss
from posttrain.models import load_tokenizer
from posttrain.models.lora import apply_lora
from posttrain.models.pairs import collate_pairs
from posttrain.models.reward import RewardModel
from posttrain.ops import aggregate
from posttrain.trainers.common import (NonFiniteGuard, RunLog, Throughput, batch_records, build_optimizer,
                                       build_scheduler, global_sum, make_accelerator, micro_batches, optimizer_step,
                                       seed_everything, step_items, total_steps, weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.sharding import eval_batches, full_model, prepare

STATS = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")


def load_pairs(cfg: RMConfig, source: str, tokenizer, print_fn) -> list[TokenizedPair]:
    pairs, report = load_preference_pairs(source, tokenizer, max_length=cfg.max_length, pairing=cfg.pairing,
                                          min_score_gap=cfg.min_score_gap, overlong=cfg.overlong,
                                          skip_invalid=cfg.skip_invalid)
    print_fn(report.summary())
    return pairs


def pair_rewards(model, pairs: list[TokenizedPair], pad_id: int, device, *,
                 prefix_sharing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen [B] and rejected [B] in one forward pass: with prefix_sharing, one row a
    pair, the prompt computed once (posttrain.models.pairs' layout; the rewards are the two
    sequences' own, tested), else the 2B sequences padded as rows of their own."""
    if not prefix_sharing:
        examples = [pair.examples()[0] for pair in pairs] + [pair.examples()[1] for pair in pairs]
        batch = pad_batch(examples, pad_id)
        rewards = model(batch.input_ids.to(device), batch.attention_mask.to(device))
        return rewards[:len(pairs)], rewards[len(pairs):]
    batch = collate_pairs(pairs, pad_id, prefix_sharing=True)
    width = batch.input_ids.shape[1]
    # Each reply's last token (its EOS): the last column of its mask.
    last = torch.stack([width - 1 - mask.flip(-1).int().argmax(-1)
                        for mask in (batch.chosen_mask, batch.rejected_mask)], dim=1)
    rewards = model(batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device),
                    last.to(device))
    return rewards[:, 0], rewards[:, 1]


def margins(cfg: RMConfig, pairs: list[TokenizedPair], device) -> torch.Tensor | None:
    """Per-pair margins [B] (0 for pairs without one), or None when unused or absent."""
    if not cfg.use_margin or all(pair.margin is None for pair in pairs):
        return None
    return torch.tensor([pair.margin or 0.0 for pair in pairs], device=device)


def global_sums(accelerator, values: list[float]) -> list[float]:
    """Sum several numbers over all processes in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


@torch.no_grad()
def evaluate(model, pairs: list[TokenizedPair], cfg: RMConfig, accelerator, pad_id: int) -> dict[str, float]:
    """Pairwise accuracy, mean margin, Bradley–Terry loss and reward mean/std on held-out pairs."""
    model.eval()
    chosen, rejected, losses = [], [], []
    for batch, counts in eval_batches(pairs, cfg.batch_size, accelerator):
        r_w, r_l = pair_rewards(model, batch, pad_id, accelerator.device, prefix_sharing=cfg.prefix_sharing)
        loss, _ = bradley_terry_loss(r_w, r_l, margin=margins(cfg, batch, accelerator.device),
                                     center_coef=cfg.center_coef)
        if not counts:
            continue
        chosen.append(r_w.float())
        rejected.append(r_l.float())
        losses.append(loss.float())
    model.train()
    r_w, r_l = torch.cat(chosen or [torch.zeros(0)]), torch.cat(rejected or [torch.zeros(0)])
    both = torch.cat([r_w, r_l])
    n, correct, margin, loss, total, squares = global_sums(accelerator, [
        len(r_w), (r_w > r_l).sum().item(), (r_w - r_l).sum().item(), sum(loss.sum().item() for loss in losses),
        both.sum().item(), both.pow(2).sum().item()])
    mean = total / (2 * n)
    return {"eval/rewards/accuracy": correct / n, "eval/rewards/margin": margin / n, "eval/loss": loss / n,
            "eval/reward_mean": mean, "eval/reward_std": math.sqrt(max(squares / (2 * n) - mean ** 2, 0.0)),
            "eval/pairs": n}


def build_model(cfg: RMConfig) -> RewardModel:
    model = RewardModel.from_causal_lm(cfg.model, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        # SEQ_CLS puts the head in peft's modules_to_save: the adapters and the head train.
        model = RewardModel(apply_lora(model.model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                       target_modules=cfg.lora_target_modules, task_type="SEQ_CLS"),
                            model.tokenizer)
    # from_pretrained returns eval mode; layers checkpoint, and LoRA drops out, only in training mode.
    return model.train()


def train(cfg: RMConfig) -> Path:
    """Train a reward model as configured; returns the folder holding the final model."""
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # Data is validated before the output folder is touched: a bad record leaves nothing behind.
    pairs = load_pairs(cfg, cfg.data, tokenizer, accelerator.print)
    eval_pairs = load_pairs(cfg, cfg.eval_data, tokenizer, accelerator.print) if cfg.eval_data else []
    fingerprint = check_output_dir(cfg, accelerator.num_processes)

    model = build_model(cfg)

    world = accelerator.num_processes
    steps = total_steps(cfg, len(pairs), world, accelerator.print, "pairs")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    model, optimizer, scheduler = prepare(accelerator, cfg, model, optimizer, scheduler)
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = resume_from_checkpoint(accelerator, cfg)["step"] if cfg.resume else 0

    pad_id = tokenizer.pad_token_id
    guard = NonFiniteGuard(cfg, "rm")
    log = RunLog(accelerator, cfg, steps, start, "rm")
    speed = Throughput()
    stop = StopRequest(accelerator, cfg, "rm", optimizer)
    with stop.installed():
        for step in range(start, steps):
            # 1. This step's pairs, and this process's micro-batches of them.
            items = step_items(step, len(pairs), cfg.global_batch(world), cfg.seed)
            mine = micro_batches(items, rank=accelerator.process_index, world_size=world,
                                 batch_size=cfg.batch_size)
            # 2. One normaliser for the whole global batch (sequence-level: every pair weighs
            #    the same); DDP averages over processes, hence / world (see ops.aggregate).
            #    `items` is the global batch, so its length is already the global pair count.
            n_pairs = len(items)
            sums = dict.fromkeys(("loss/train", *STATS), 0.0)
            with weights_cast_once(accelerator, model):
                for i, mb in enumerate(mine):
                    batch = [pairs[j] for j in mb]
                    with nullcontext() if i == len(mine) - 1 else accelerator.no_sync(model):
                        # 3. One forward over chosen + rejected; Σ BT loss / global pair count.
                        r_w, r_l = pair_rewards(model, batch, pad_id, accelerator.device,
                                                prefix_sharing=cfg.prefix_sharing)
                        per_pair, stats = bradley_terry_loss(r_w, r_l, margin=margins(cfg, batch, accelerator.device),
                                                             center_coef=cfg.center_coef)
                        every_pair = torch.ones_like(per_pair, dtype=torch.bool)[:, None]
                        loss = aggregate(per_pair[:, None], every_pair, mode="sequence", normalizer=n_pairs / world)
                        accelerator.backward(loss)
                    sums["loss/train"] += per_pair.detach().sum().item()
                    for key in STATS:
                        sums[key] += stats[key].item() * len(batch)
                    speed.add(len(batch))
            # 4. Clip, step, schedule.
            grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, guard,
                                       step=step + 1, batch=batch_records(pairs, items, cfg.data))

            done = step + 1
            stop.step_done(done)
            if done % cfg.logging_steps == 0 or done == steps:
                train_metrics = dict(zip(sums, (v / n_pairs for v in global_sums(accelerator, list(sums.values())))))
                rate = global_sum(accelerator, speed.rate())
                log.log(done, {**train_metrics, "perf/pairs_per_s": rate, "optim/lr": scheduler.get_last_lr()[0],
                               "optim/grad_norm": grad_norm,
                               **guard.metrics(),
                               "train/epoch": done * cfg.global_batch(world) / len(pairs)})
                log.progress(0, {"loss": f"{train_metrics['loss/train']:.4f}",
                                 "acc": f"{train_metrics['rewards/accuracy']:.2f}", "pairs/s": f"{rate:.1f}"})
            log.progress(1, {})
            if eval_pairs and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps:
                log.log(done, evaluate(model, eval_pairs, cfg, accelerator, pad_id))
            if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
                save_checkpoint(accelerator, cfg, done)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, "rm", stop.signum)

    if eval_pairs:
        metrics = evaluate(model, eval_pairs, cfg, accelerator, pad_id)
        log.log(steps, metrics)
        accelerator.print(f"eval/rewards/accuracy {metrics['eval/rewards/accuracy']:.4f}  "
                          f"eval/rewards/margin {metrics['eval/rewards/margin']:.4f}")

    guard.check_weights(model)
    final = full_model(accelerator, model)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        final.save_pretrained(out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "reward model", step=steps, command="rm")
