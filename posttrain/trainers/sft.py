"""Instruction tuning (SFT): the next-token loss on completion / assistant tokens.

Stages of one optimizer step:
  1. take this step's global batch of records (a function of step and seed only);
  2. count the loss tokens of the whole global batch, across micro-batches and processes;
  3. per micro-batch: token log-probs at loss positions only, loss = Σ −log π / that count;
  4. clip, step AdamW and the schedule; log, evaluate and checkpoint on their cadences.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain.config import SFTConfig
from posttrain.data import collate_packed, load_sft_examples, pack_examples, pad_batch
from posttrain.models import fit_model_to_tokenizer, load_causal_lm, load_tokenizer_with_template
from posttrain.models.lora import apply_lora, save_model
from posttrain.models.logprobs import TokenLogprobs
from posttrain.ops import aggregate, masked_sum
from posttrain.trainers.common import (NonFiniteGuard, RunLog, Throughput, build_optimizer, build_scheduler,
                                       global_sum, make_accelerator, micro_batches, optimizer_step, seed_everything,
                                       step_items, total_steps, weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.sharding import eval_batches, full_model, prepare


def load_units(cfg: SFTConfig, source: str, tokenizer, print_fn) -> list[list]:
    """Tokenised records grouped into training rows: one record a row, or packed rows."""
    examples, report = load_sft_examples(source, tokenizer, max_length=cfg.max_length,
                                         overlong=cfg.overlong, train_on_prompt=cfg.train_on_prompt,
                                         skip_invalid=cfg.skip_invalid)
    print_fn(report.summary())
    if cfg.packing:
        return pack_examples(examples, cfg.max_length)
    return [[example] for example in examples]


def collate(cfg: SFTConfig, rows: list[list], pad_id: int):
    if cfg.packing:
        return collate_packed(rows, pad_id, cfg.max_length)
    return pad_batch([row[0] for row in rows], pad_id)


def forward_nll(policy, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood [B,T] (0 off the loss mask) and the loss mask."""
    mask = batch.loss_mask.to(device)
    attention = None if batch.attention_mask is None else batch.attention_mask.to(device)
    logprobs = policy(batch.input_ids.to(device), attention, batch.position_ids.to(device), mask)
    return -logprobs, mask


@torch.no_grad()
def evaluate(policy, units, cfg: SFTConfig, accelerator, pad_id: int) -> dict[str, float]:
    """Token-mean NLL over the held-out rows, each process taking an interleaved share."""
    policy.eval()
    nll, tokens = 0.0, 0
    for rows, counts in eval_batches(units, cfg.batch_size, accelerator):
        per_token, mask = forward_nll(policy, collate(cfg, rows, pad_id), accelerator.device)
        if counts:
            nll += masked_sum(per_token, mask).item()
            tokens += int(mask.sum())
    policy.train()
    nll, tokens = global_sum(accelerator, nll), global_sum(accelerator, tokens)
    return {"eval/loss": nll / max(tokens, 1), "eval/tokens": tokens}


def train(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the folder holding the final model."""
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    # With --chat-template the tokenizer gains the template, its tokens and EOS before any record
    # is tokenised; the model gets matching rows below, and both are saved together.
    tokenizer, template = load_tokenizer_with_template(cfg.model, cfg.chat_template)
    if template is not None:
        accelerator.print(template.summary())
    # Data is validated before the output folder is touched: a bad record leaves nothing behind.
    units = load_units(cfg, cfg.data, tokenizer, accelerator.print)
    eval_units = load_units(cfg, cfg.eval_data, tokenizer, accelerator.print) if cfg.eval_data else []
    fingerprint = check_output_dir(cfg, accelerator.num_processes)

    model = load_causal_lm(cfg.model)
    if template is not None:
        fit_model_to_tokenizer(model, tokenizer, template)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules,
                           trainable_tokens=template.new_token_ids if template is not None else ())
    # from_pretrained returns eval mode; layers checkpoint, and LoRA drops out, only in training mode.
    policy = TokenLogprobs(model).train()
    world = accelerator.num_processes
    steps = total_steps(cfg, len(units), world, accelerator.print, "packed rows" if cfg.packing else "examples")
    optimizer = build_optimizer(policy, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    policy, optimizer, scheduler = prepare(accelerator, cfg, policy, optimizer, scheduler)
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = resume_from_checkpoint(accelerator, cfg)["step"] if cfg.resume else 0

    pad_id = tokenizer.pad_token_id
    guard = NonFiniteGuard(cfg, "sft")
    log = RunLog(accelerator, cfg, steps, start, "sft")
    speed = Throughput()
    stop = StopRequest(accelerator, cfg, "sft", optimizer)
    with stop.installed():
        for step in range(start, steps):
            # 1. This step's rows, and this process's micro-batches of them.
            items = step_items(step, len(units), cfg.global_batch(world), cfg.seed)
            mine = micro_batches(items, rank=accelerator.process_index, world_size=world,
                                 batch_size=cfg.batch_size)
            batches = [collate(cfg, [units[i] for i in mb], pad_id) for mb in mine]
            # 2. One normaliser for the whole global batch: accumulation and DDP then give
            #    the gradient of one big batch. DDP averages over processes, hence / world.
            n_loss = global_sum(accelerator, sum(int(b.loss_mask.sum()) for b in batches))
            nll_sum = 0.0
            with weights_cast_once(accelerator, policy):
                for i, batch in enumerate(batches):
                    last = i == len(batches) - 1
                    with nullcontext() if last else accelerator.no_sync(policy):
                        # 3. Σ −log π over loss tokens / global count.
                        per_token, mask = forward_nll(policy, batch, accelerator.device)
                        loss = aggregate(per_token, mask, mode="token", normalizer=n_loss / world)
                        accelerator.backward(loss)
                    nll_sum += masked_sum(per_token.detach(), mask).item()
                    speed.add(sum(len(ex.input_ids) for mb in mine[i] for ex in units[mb]))
            # 4. Clip, step, schedule.
            grad_norm = optimizer_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm, guard,
                                       step=step + 1, batch=f"rows {sorted(i + 1 for i in items)} of {cfg.data}")

            done = step + 1
            stop.step_done(done)
            train_loss = global_sum(accelerator, nll_sum) / max(n_loss, 1)
            if done % cfg.logging_steps == 0 or done == steps:
                rate = global_sum(accelerator, speed.rate())
                log.log(done, {"loss/train": train_loss, "perf/tokens_per_s": rate,
                               "optim/lr": scheduler.get_last_lr()[0], "optim/grad_norm": grad_norm,
                               **guard.metrics(),
                               "train/epoch": done * cfg.global_batch(world) / len(units),
                               "train/loss_tokens": n_loss})
                log.progress(0, {"loss": f"{train_loss:.4f}", "tok/s": f"{rate:.0f}"})
            log.progress(1, {})
            if eval_units and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps:
                log.log(done, evaluate(policy, eval_units, cfg, accelerator, pad_id))
            if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
                save_checkpoint(accelerator, cfg, done)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, "sft", stop.signum)

    if eval_units:
        metrics = evaluate(policy, eval_units, cfg, accelerator, pad_id)
        log.log(steps, metrics)
        accelerator.print(f"eval/loss {metrics['eval/loss']:.4f}")

    guard.check_weights(policy)
    final = full_model(accelerator, policy)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        save_model(final.model, tokenizer, out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "model", step=steps, command="sft")
