"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), one iteration at a time:

  1. generate: sample one response per prompt of this iteration's rollout batch;
  2. score: the reward model at each response's last token, or a reward function;
  3. reference & values: log π_old, log π_ref and V_old of every response token;
  4. KL-shaped rewards: r_t = −β·KL_t, plus the score on the last token;
  5. advantages: GAE over those rewards, whitened over the batch;
  6. PPO epochs: ppo_epochs passes of clipped surrogate + clipped value loss, in minibatches.

Stages 1–5 only read the networks (no gradients); stage 6 trains the policy and the critic
with one AdamW. Shapes: B rollouts, A response tokens. GRPO and RLOO (trainers/grpo.py)
drop stage 3's values and replace stage 5 (`advantages_and_returns`) by group-relative
advantages.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from posttrain.advantages import gae, kl_shaped_rewards
from posttrain.config import PPOConfig
from posttrain.data import TokenizedPrompt, load_prompts
from posttrain.losses import ppo_policy_loss, value_loss
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.lora import apply_lora, disabled_adapters, save_model
from posttrain.models.reward import RewardModel
from posttrain.models.value import PolicyAndValue, ValueModel, disable_dropout, new_value_head
from posttrain.ops import aggregate, masked_sum, masked_whiten
from posttrain.rollout.rollout import Rollout
from posttrain.rollout.scoring import RunningMoments, normalize_and_clip, penalize_missing_eos
from posttrain.sampling import Generation, Sampler, SamplingParams
from posttrain.scoring import RewardModelScorer, load_scorer, same_tokenization, score_generation
from posttrain.trainers.common import (NonFiniteGuard, RunLog, batch_records, build_optimizer, build_scheduler,
                                       global_sum, make_accelerator, rollout_iterations, seed_everything, step_items,
                                       weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.kl_control import AdaptiveKLController, FixedKLController
from posttrain.trainers.sharding import full_model, padded_share, prepare, refresh, prepare_frozen, whole_copy

SAMPLES_PER_LOG = 8
"""Rollouts of the main process written to samples.jsonl each samples_steps iterations."""


def build_networks(cfg: PPOConfig) -> tuple[PolicyAndValue, torch.nn.Module | None]:
    """The trained policy + critic, and the frozen reference (None with LoRA: the policy
    with adapters off is the reference, no second copy)."""
    policy = load_causal_lm(cfg.model)
    disable_dropout(policy)
    reference = None if cfg.lora_r else copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = dict(alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)
    if cfg.lora_r:
        policy = apply_lora(policy, r=cfg.lora_r, **lora)
        disable_dropout(policy)  # the adapters' own dropout
    if cfg.value_head:
        head = new_value_head(policy.config.hidden_size)
        return PolicyAndValue(policy, value_head=head, temperature=cfg.temperature).train(), reference
    # The critic starts as the reward model (head included) or, with a reward function, as
    # the policy's decoder with a zero head.
    source = cfg.value_model or cfg.reward_model
    critic = ValueModel(RewardModel.from_pretrained(source)) if source else ValueModel.from_causal_lm(cfg.model)
    disable_dropout(critic)
    if cfg.gradient_checkpointing:  # the critic is as deep as the policy: its activations weigh as much
        critic.reward_model.base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.critic_lora_r:
        rm = critic.reward_model
        critic = ValueModel(RewardModel(apply_lora(rm.model, r=cfg.critic_lora_r, task_type="SEQ_CLS", **lora),
                                        rm.tokenizer))
        disable_dropout(critic)
    # from_pretrained returns eval mode; layers checkpoint only in training mode (dropout is off either way).
    return PolicyAndValue(policy, critic=critic, temperature=cfg.temperature).train(), reference


def build_scorer(cfg: PPOConfig, tokenizer, accelerator):
    """(generation, prompts) -> raw scores [B] float32 on the CPU (stage 2), from the spec
    rm:REWARD_MODEL or fn:REWARD_FN. A reward model is frozen, so it is stored in the compute
    precision (half the memory under bf16)."""
    # reward_fn is module:function; the fn:module:function of --judges specs is read as the same.
    spec = f"fn:{cfg.reward_fn.removeprefix('fn:')}" if cfg.reward_fn else f"rm:{cfg.reward_model}"
    scorer = load_scorer(spec, batch_size=cfg.batch_size, precision=cfg.precision, device=accelerator.device)
    if isinstance(scorer, RewardModelScorer):
        reuse = same_tokenization(scorer.model.tokenizer, tokenizer)
        accelerator.print(f"reward model {cfg.reward_model}: "
                          + ("same tokenizer, scores the rollout ids" if reuse else "re-tokenises the text"))

    def score(gen: Generation, prompts: list[TokenizedPrompt]) -> torch.Tensor:
        return score_generation(scorer, gen, [p.messages for p in prompts], [p.record for p in prompts],
                                tokenizer=tokenizer)
    return score


@torch.no_grad()
def old_policy_and_reference(net: PolicyAndValue, reference, gen: Generation, cfg: PPOConfig,
                             accelerator) -> dict[str, torch.Tensor]:
    """Stage 3: logprobs, entropy and values of the sampling policy, and ref_logprobs, each
    [B, A] on the CPU, computed in micro-batches of batch_size; the policy's log-probs,
    entropy (same vocabulary pass) and, with a value head, values come from one forward."""
    input_ids, attention, positions = gen.sequences()
    parts = defaultdict(list)
    device = accelerator.device
    for start in range(0, input_ids.shape[0], cfg.batch_size):
        rows = slice(start, start + cfg.batch_size)
        batch = [t[rows].to(device) for t in (input_ids, attention, positions, gen.response_mask)]
        with accelerator.autocast():
            logprobs, entropy, values = net(*batch, with_entropy=True)
            # Through the modules' own forward, where a sharded model gathers its weights.
            if reference is not None:
                ref_logprobs = reference(*batch)[0]
            else:
                with disabled_adapters(net.policy):
                    ref_logprobs = net(*batch, with_values=False)[0]
        for name, value in zip(("logprobs", "entropy", "values", "ref_logprobs"),
                               (logprobs, entropy, values, ref_logprobs)):
            parts[name].append(value.cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def advantages_and_returns(rollout: Rollout, cfg: PPOConfig, kl_coef: float, reduce_sum=None):
    """Stages 4–5: (advantages [B, A], returns [B, A], kl [B, A]); where PPO differs from GRPO
    and RLOO. `reduce_sum` sums a tensor over processes (whitening)."""
    rewards, kl = kl_shaped_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                    rollout.response_mask, kl_coef=kl_coef, estimator=cfg.kl_estimator)
    advantages, returns = gae(rewards, rollout.values, rollout.response_mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        # Over all processes' rollouts, so N processes whiten as one batch would.
        advantages = masked_whiten(advantages, rollout.response_mask, reduce_sum=reduce_sum)
    return advantages, returns, kl


def ppo_epochs(model, optimizer, accelerator, rollout: Rollout, advantages, returns, cfg: PPOConfig, *,
               guard: NonFiniteGuard, step: int, batch: str) -> dict:
    """Stage 6: ppo_epochs passes over the rollouts in minibatches, one optimizer step each,
    accumulated over micro-batches with one global token count; stops early when a
    minibatch's approximate KL to π_old passes early_stop_kl. Returns token-mean stats. The
    guard skips a non-finite update (iteration `step`, prompts `batch`)."""
    world, device = accelerator.num_processes, accelerator.device
    n_local, per_minibatch, _ = cfg.sizes(world)
    sums, epochs_done = defaultdict(float), 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n_local)
        stop = False
        for start in range(0, n_local, per_minibatch):
            minibatch = order[start: start + per_minibatch]
            n_tokens = global_sum(accelerator, int(rollout.response_mask[minibatch].sum()))
            micro = minibatch.split(cfg.batch_size)
            kl_sum = 0.0
            with weights_cast_once(accelerator, model):
                for i, rows in enumerate(micro):
                    part = rollout.select(rows)
                    mask = part.response_mask.to(device)
                    with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model):
                        logprobs, _, values = model(*(t.to(device) for t in part.sequences()), mask)
                        pg, pg_stats = ppo_policy_loss(logprobs, part.logprobs.to(device), advantages[rows].to(device),
                                                       mask, clip_eps=cfg.clip_eps)
                        vf, vf_stats = value_loss(values, part.values.to(device), returns[rows].to(device), mask,
                                                  clip_eps=cfg.value_clip_eps)
                        # One normaliser for the minibatch across micro-batches and processes.
                        loss = aggregate(pg + cfg.vf_coef * vf, mask, "token", normalizer=n_tokens / world)
                        accelerator.backward(loss)
                    count = int(mask.sum())
                    error = (values.detach() - returns[rows].to(device)) ** 2
                    kl_sum += float(pg_stats["policy/approx_kl"]) * count
                    for key, value in (("loss/policy", masked_sum(pg.detach(), mask)),
                                       ("loss/value", masked_sum(vf.detach(), mask)),
                                       ("value/error", masked_sum(error, mask))):
                        sums[key] += float(value)
                    # The losses' statistics are logged under their own names (token means, summed here).
                    for key, value in {**pg_stats, **vf_stats}.items():
                        sums[key] += float(value) * count
                    sums["tokens"] += count
            grad_norm = guard.apply(accelerator, model, optimizer, cfg.max_grad_norm, step=step, batch=batch)
            if cfg.max_grad_norm > 0:
                sums["optim/grad_norm"] += grad_norm
            sums["steps"] += 1
            if cfg.early_stop_kl and global_sum(accelerator, kl_sum) / max(n_tokens, 1) > cfg.early_stop_kl:
                stop = True
                break
        epochs_done += 1
        if stop:
            break
    totals = {key: global_sum(accelerator, value) for key, value in sums.items()}
    stats = {key: value / max(totals["tokens"], 1) for key, value in totals.items()
             if key not in ("tokens", "steps", "optim/grad_norm")}
    # Every process holds the same (all-reduced) norm, so the global sum counts it world times.
    stats["optim/grad_norm"] = (totals["optim/grad_norm"] / world / totals["steps"] if cfg.max_grad_norm > 0
                                else float("nan"))
    stats["policy/epochs"] = epochs_done
    return stats


def rollout_metrics(rollout: Rollout, returns, kl, kl_coef: float, accelerator) -> dict[str, float]:
    """Global means over the iteration's rollouts (per response or per token, as named)."""
    mask = rollout.response_mask
    kl_per_response = kl.sum(-1)
    sums = {"objective/scores": rollout.raw_scores.sum(), "objective/kl": kl_per_response.sum(),
            "objective/rlhf_reward": (rollout.scores - kl_coef * kl_per_response).sum(),
            "objective/missing_eos": (~rollout.ended).float().sum(),
            "rollout/response_length": mask.sum(-1).float().sum()}
    token_sums = {"objective/entropy": masked_sum(rollout.entropy, mask), "value/returns": masked_sum(returns, mask),
                  "value/values": masked_sum(rollout.values, mask)}
    n, tokens = global_sum(accelerator, mask.shape[0]), global_sum(accelerator, int(mask.sum()))
    out = {key: global_sum(accelerator, float(v)) / n for key, v in sums.items()}
    out.update({key: global_sum(accelerator, float(v)) / max(tokens, 1) for key, v in token_sums.items()})
    out["objective/kl_coef"] = kl_coef
    return out


def sampling_params(cfg: PPOConfig, iteration: int) -> SamplingParams:
    """One response per prompt; iteration −1 is the held-out evaluation's fixed stream. The
    seed depends on the iteration only, so a resumed run draws the samples it would have drawn."""
    return SamplingParams(n=1, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          stop_strings=tuple(s for s in cfg.stop_strings.split("|") if s),
                          seed=cfg.seed * 1_000_003 + iteration)


def generate(sampler: Sampler, prompts: list[TokenizedPrompt], indices: list[int],
             params: SamplingParams) -> Generation:
    """Stage 1: one response to each prompts[i], i in indices, from the sampler's copy of the
    policy's weights; prompt_index counts positions in `prompts`."""
    gen = sampler.generate([prompts[i] for i in indices], params)
    return replace(gen, prompt_index=torch.tensor(indices)[gen.prompt_index])


@torch.no_grad()
def evaluate(net, reference, sampler, prompts, score, cfg: PPOConfig, accelerator) -> dict:
    """Mean score, KL to the reference (Σ_t log π/π_ref per response, k1: unbiased under π)
    and response length over the held-out prompts, sampled as in training from a fixed seed
    so evaluations differ only by the policy."""
    mine, real = padded_share(list(range(len(prompts))), accelerator)
    totals = defaultdict(float)
    for start in range(0, len(mine), cfg.rollout_batch_size):
        gen = generate(sampler, prompts, mine[start: start + cfg.rollout_batch_size], sampling_params(cfg, -1))
        forward = old_policy_and_reference(net, reference, gen, cfg, accelerator)
        kl = masked_sum(forward["logprobs"] - forward["ref_logprobs"], gen.response_mask, dim=-1)
        counted = slice(0, max(real - start, 0))  # one response per prompt; the rest is padding
        totals["eval/scores"] += float(score(gen, prompts)[counted].sum())
        totals["eval/kl"] += float(kl[counted].sum())
        totals["eval/response_length"] += float(gen.response_mask[counted].sum())
    return {key: global_sum(accelerator, value) / len(prompts) for key, value in totals.items()}


def write_samples(path: Path, step: int, rollout: Rollout) -> None:
    with path.open("a") as f:
        for i in range(min(SAMPLES_PER_LOG, len(rollout.prompts))):
            f.write(json.dumps({"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i],
                                "score": float(rollout.raw_scores[i]), "ended": bool(rollout.ended[i])}) + "\n")


def train(cfg: PPOConfig) -> Path:
    """Run PPO as configured; returns the folder holding the final policy."""
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    n_local = cfg.sizes(world)[0]
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    prompts, report = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_length,
                                   skip_invalid=cfg.skip_invalid)
    accelerator.print(report.summary())
    eval_prompts = []
    if cfg.eval_data:
        eval_prompts, report = load_prompts(cfg.eval_data, tokenizer, max_prompt_length=cfg.max_length,
                                            skip_invalid=cfg.skip_invalid)
        accelerator.print(report.summary())
    score = build_scorer(cfg, tokenizer, accelerator)
    # Data and the judge are checked before the output folder; it is written once the models have loaded.
    fingerprint = check_output_dir(cfg, world)
    net, reference = build_networks(cfg)
    if reference is not None:
        # Its log-probs come from a forward of its own, where a sharded model gathers its weights.
        reference = PolicyAndValue(reference, temperature=cfg.temperature).to(accelerator.device)
        prepare_frozen(accelerator, cfg, reference)
    iterations = rollout_iterations(cfg, len(prompts), accelerator.print)
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, cfg, iterations)
    model, optimizer, scheduler = prepare(accelerator, cfg, net, optimizer, scheduler)
    net = accelerator.unwrap_model(model)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
              if cfg.adaptive_kl_target else FixedKLController(cfg.kl_coef))
    moments = RunningMoments() if cfg.normalize_scores else None
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = 0
    if cfg.resume:
        state = resume_from_checkpoint(accelerator, cfg)
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        if moments is not None:
            moments.load_state_dict(state["moments"])
    # Samples from its own inference copy of the policy (bf16 under bf16), re-synced after each update;
    # a sharded policy is first gathered whole on every process (`whole`).
    whole = whole_copy(accelerator, model)
    sampler = Sampler(whole.policy, tokenizer, precision=cfg.precision, batch_size=n_local)
    guard = NonFiniteGuard(cfg, "ppo")
    log = RunLog(accelerator, cfg, iterations, start, "ppo")
    samples_path = Path(cfg.output_dir) / "samples.jsonl"
    evaluate_now = partial(evaluate, net, reference, sampler, eval_prompts, score, cfg, accelerator)
    if eval_prompts and start == 0:
        log.log(0, evaluate_now())
    stop = StopRequest(accelerator, cfg, "ppo", optimizer)
    with stop.installed():
        for it in range(start, iterations):
            began = time.perf_counter()
            indices = step_items(it, len(prompts), cfg.rollout_batch_size, cfg.seed)[rank * n_local:
                                                                                     (rank + 1) * n_local]
            # 1. Generate.
            gen = generate(sampler, prompts, indices, sampling_params(cfg, it))
            # 2. Score: raw scores, missing-EOS penalty, running normalisation, clipping.
            raw = score(gen, prompts)
            penalized = penalize_missing_eos(raw, gen.ended, cfg.missing_eos_penalty)
            if moments is not None:
                moments.update(accelerator.gather(penalized.to(accelerator.device)).cpu())
            scores = normalize_and_clip(penalized, moments, cfg.score_clip)
            # 3. Reference log-probs, old log-probs and values.
            rollout = Rollout(**vars(gen), scores=scores, raw_scores=raw,
                              **old_policy_and_reference(net, reference, gen, cfg, accelerator))
            # 4. KL-shaped rewards and 5. advantages.
            kl_coef = kl_ctl.value
            advantages, returns, kl = advantages_and_returns(
                rollout, cfg, kl_coef, reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"))
            rolled = time.perf_counter()
            # 6. PPO epochs.
            stats = ppo_epochs(model, optimizer, accelerator, rollout, advantages, returns, cfg, guard=guard,
                               step=it + 1, batch=batch_records(prompts, indices, cfg.data))
            refresh(whole, model)
            sampler.sync()
            scheduler.step()
            metrics = rollout_metrics(rollout, returns, kl, kl_coef, accelerator)
            kl_ctl.update(metrics["objective/kl"], cfg.rollout_batch_size)
            done, now = it + 1, time.perf_counter()
            extra = {"kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict() if moments else None}
            stop.step_done(done, extra)
            metrics.update(stats)
            metrics.update({"time/rollout": rolled - began, "time/update": now - rolled,
                            "perf/episodes_per_s": cfg.rollout_batch_size / (now - began),
                            "optim/lr": scheduler.get_last_lr()[0], **guard.metrics()})
            if done % cfg.logging_steps == 0 or done == iterations:
                log.log(done, metrics)
            log.progress(1, {"score": f"{metrics['objective/scores']:.3f}", "kl": f"{metrics['objective/kl']:.3f}"})
            if accelerator.is_main_process and cfg.samples_steps and done % cfg.samples_steps == 0:
                write_samples(samples_path, done, rollout)
            if eval_prompts and cfg.eval_steps and done % cfg.eval_steps == 0 and done < iterations:
                log.log(done, evaluate_now())
            if cfg.save_steps and done % cfg.save_steps == 0 and done < iterations:
                save_checkpoint(accelerator, cfg, done, extra)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, "ppo", stop.signum, extra=extra)

    if eval_prompts:
        log.log(iterations, evaluate_now())

    extra = {"kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict() if moments else None}
    guard.check_weights(model)
    final = full_model(accelerator, model)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        save_model(final.policy, tokenizer, out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "policy", step=iterations, command="ppo", extra=extra)
