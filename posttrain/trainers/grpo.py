"""Online RL without a critic: GRPO (Shao et al. 2024, "DeepSeekMath" §4) and RLOO (Ahmadian et
al. 2024, "Back to Basics"), one iteration at a time:

  1. generate: sample K = num_generations responses to each prompt of the rollout batch;
  2. score: the weighted sum of the judges' scores (reward models, reward functions);
  3. reference & old policy: log π_ref (β > 0) and log π_old (μ > 1, several minibatches, or
     the KL-shaped reward where stage 6 cannot give it: see `shaped_in_training`);
  4. rewards: minus the missing-EOS penalty, minus β · Σ_t log π/π_ref with kl_in_reward (RLOO);
  5. advantages: relative to the group — minus its mean (GRPO, ÷ std unless Dr. GRPO) or
     minus the mean of the other K − 1 (RLOO) — the same for every token of a response;
  6. policy epochs: num_iterations passes of the clipped surrogate (+ β · k3 per token when the
     KL is a loss term), in minibatches, reduced as loss_type says.

No value model and no GAE: PPO differs from this loop in stages 3 and 5 only. Shapes: B
responses (prompts × K, a prompt's K adjacent), A response tokens. `posttrain rloo` runs this
loop with RLOOConfig's defaults.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from posttrain.advantages import ADVANTAGES, per_token, zero_variance_groups
from posttrain.config import GRPOConfig, RLOOConfig
from posttrain.data import TokenizedPrompt, load_prompts
from posttrain.losses import grpo_loss, kl_k1
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.lora import apply_lora, disabled_adapters, save_model
from posttrain.models.value import PolicyAndValue, disable_dropout
from posttrain.ops import LOSS_TYPES, aggregate, aggregate_count, masked_sum
from posttrain.sampling import Generation, Sampler, SamplingParams
from posttrain.scoring import load_scorer, score_generation
from posttrain.trainers.common import (NonFiniteGuard, RunLog, batch_records, build_optimizer, build_scheduler,
                                       global_sum, make_accelerator, rollout_iterations, seed_everything, step_items,
                                       weights_cast_once)
from posttrain.trainers.run_folder import check_output_dir, prepare_output_dir, resume_from_checkpoint, save_checkpoint
from posttrain.trainers.stopping import StopRequest, checkpoint_and_exit, finish_run
from posttrain.trainers.sharding import full_model, padded_share, prepare, refresh, prepare_frozen, whole_copy

SAMPLES_PER_LOG = 8
"""Responses of the main process written to samples.jsonl each samples_steps iterations."""

NO_GRAD_BATCHES = 4
"""Stage 3's no-grad forwards (log π_ref, log π_old) take this many micro-batches of batch_size
responses at once. A no-grad forward holds one layer's activations at a time, where a training
forward keeps every layer's for its backward, so 4× the rows stay small beside a training
micro-batch. Fewer, larger matrix products: on 4 SmolLM2 groups (4 responses of ≤ 32
tokens to prompts of 30–64, prefix-shared) the reference pass took 0.78–0.84 s at once against
0.97–1.03 s in 4 micro-batches (2 threads, alternating, 5 passes each)."""


def build_networks(cfg: GRPOConfig) -> tuple[PolicyAndValue, torch.nn.Module | None]:
    """The trained policy (no critic), and the frozen reference when β > 0 or held-out data
    asks for the KL to it; None otherwise, and with LoRA (the policy with adapters off is the
    reference)."""
    policy = load_causal_lm(cfg.model)
    disable_dropout(policy)
    wanted = cfg.beta > 0 or bool(cfg.eval_data)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if wanted and not cfg.lora_r else None
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_target_modules)
        disable_dropout(policy)
    # from_pretrained returns eval mode; layers checkpoint only in training mode (dropout is off either way).
    return PolicyAndValue(policy, temperature=cfg.temperature).train(), reference


def build_reward(cfg: GRPOConfig, tokenizer, accelerator):
    """(generation, prompts) -> (rewards [B] float32, per-judge mean scores): Σ_j w_j · score_j."""
    scorers = [load_scorer(spec, batch_size=cfg.batch_size, precision=cfg.precision, device=accelerator.device)
               for spec in cfg.judge_specs()]

    def reward(gen: Generation, prompts: list[TokenizedPrompt]) -> tuple[torch.Tensor, dict[str, float]]:
        total, means = torch.zeros(len(gen.responses)), {}
        for spec, weight, scorer in zip(cfg.judge_specs(), cfg.weights(), scorers):
            scores = score_generation(scorer, gen, [p.messages for p in prompts], [p.record for p in prompts],
                                      tokenizer=tokenizer)
            total += weight * scores
            means[f"rewards/{spec}"] = float(scores.mean())
        return total, means
    return reward


def sampling_params(cfg: GRPOConfig, iteration: int) -> SamplingParams:
    """K responses per prompt; the seed depends on the iteration only, so a resumed run draws the
    samples it would have drawn (iteration −1 is the held-out evaluation's fixed stream)."""
    return SamplingParams(n=cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, stop_strings=tuple(s for s in cfg.stop_strings.split("|") if s),
                          seed=cfg.seed * 1_000_003 + iteration)


def generate(sampler: Sampler, prompts: list[TokenizedPrompt], indices: list[int],
             params: SamplingParams) -> Generation:
    """Stage 1: params.n responses to each prompts[i], i in indices (a prompt's adjacent);
    prompt_index counts positions in `prompts`."""
    gen = sampler.generate([prompts[i] for i in indices], params)
    return replace(gen, prompt_index=torch.tensor(indices)[gen.prompt_index])


def response_logprobs_of(net, part: Generation, cfg: GRPOConfig, device) -> torch.Tensor:
    """log π [b, A] of part's b responses under net (a PolicyAndValue or its wrapper), 0 off
    the response mask. With prefix_sharing, responses to the same prompt share a row and the
    prompt goes through the model once (Generation.shared_prompt_rows): on the benchmark's
    GRPO micro-batches (one prompt of ~46 tokens, 4 responses of ≤ 32) that is ~0.56× the tokens."""
    shared = part.shared_prompt_rows() if cfg.prefix_sharing else None
    if shared is None:
        return net(*(t.to(device) for t in (*part.sequences(), part.response_mask)))[0]
    inputs = (shared.input_ids, shared.members, shared.position_ids, shared.target_mask)
    return shared.per_response(net(*(t.to(device) for t in inputs))[0])


@torch.no_grad()
def logprobs_of(net: PolicyAndValue, reference, gen: Generation, cfg: GRPOConfig, accelerator, *,
                old: bool, ref: bool) -> dict[str, torch.Tensor]:
    """Stage 3: "old" log π_old [B, A] (if old) and "ref" log π_ref [B, A] (if ref: β > 0 in
    training, always in evaluation), on the CPU, NO_GRAD_BATCHES micro-batches of batch_size at a time."""
    parts, rows = defaultdict(list), cfg.batch_size * NO_GRAD_BATCHES
    for start in range(0, len(gen.responses), rows):
        part = gen.select(slice(start, start + rows))
        with accelerator.autocast():
            if old:
                parts["old"].append(response_logprobs_of(net, part, cfg, accelerator.device).cpu())
            # Through the modules' own forward, where a sharded model gathers its weights.
            if ref:
                ref_net = reference if reference is not None else net
                with nullcontext() if reference is not None else disabled_adapters(net.policy):
                    parts["ref"].append(response_logprobs_of(ref_net, part, cfg, accelerator.device).cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def shaped_advantages(scores: torch.Tensor, gen: Generation, old: torch.Tensor | None, ref: torch.Tensor | None,
                      cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Stages 4–5 for whole groups (b responses of `gen`, a prompt's K adjacent; scores [b]; old
    and ref [b, A] log-probs, read with kl_in_reward only) -> (rewards [b], the KL Σ_t log
    π_old/π_ref [b] or None, token advantages [b, A], zero-variance flags [b] bool).

    Rewards: the scores minus the missing-EOS penalty and, with kl_in_reward, minus β · KL
    (k1, unbiased per response under π_old's samples)."""
    rewards = scores - cfg.missing_eos_penalty * (~gen.ended).float()
    kl = None
    if cfg.kl_in_reward:
        kl = masked_sum(kl_k1(old, ref), gen.response_mask, dim=-1)
        rewards = rewards - cfg.beta * kl
    advantages = ADVANTAGES[cfg.advantage](rewards, group_size=cfg.num_generations, scale=cfg.scale_rewards)
    flat = zero_variance_groups(rewards, group_size=cfg.num_generations)
    if cfg.drop_zero_variance:
        advantages = torch.where(flat, 0.0, advantages)
    return rewards, kl, per_token(advantages, gen.response_mask), flat


@dataclass
class InTrainingShaping:
    """Stages 4–5 done in stage 6 (shaped_in_training): the scores [B] policy_epochs reads, and
    the rewards [B], KL [B] and zero-variance flags [B] bool it fills in, micro-batch by
    micro-batch, for the iteration's metrics."""

    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def of(cls, scores: torch.Tensor) -> "InTrainingShaping":
        zeros = torch.zeros_like(scores)
        return cls(scores, zeros.clone(), zeros.clone(), zeros.bool())


def shaped_in_training(cfg: GRPOConfig) -> bool:
    """Whether stage 6 computes stages 4–5 itself, from its forward's own log-probs: with the
    KL-shaped reward, μ = 1 and one minibatch, the weights do not move between sampling and the
    single optimizer step, so the training forward's detached log-probs are log π_old, and the
    separate no-grad forward TRL makes for them (a third of RLOO's step) is skipped. Each
    micro-batch must then hold whole groups (batch_size a multiple of K) for the group baseline."""
    return (cfg.kl_in_reward and cfg.num_iterations == 1 and cfg.num_minibatches == 1
            and cfg.batch_size % cfg.num_generations == 0)


def policy_epochs(model, optimizer, accelerator, gen: Generation, advantages, old, ref, cfg: GRPOConfig, *,
                  guard: NonFiniteGuard, step: int, batch: str, shaping: InTrainingShaping | None = None) -> dict:
    """Stage 6: num_iterations passes over the responses in minibatches, one optimizer step
    each, accumulated over micro-batches with one global normaliser (ops.aggregate). old / ref:
    [B, A] log-probs or None (then the ratio is taken against the detached current log-probs,
    which is exactly 1 on the first pass: TRL's shortcut for μ = 1). The guard skips a
    non-finite update (iteration `step`, prompts `batch`).

    shaping (when shaped_in_training): advantages is None and each micro-batch, whole groups in
    a random group order, gets its advantages from shaped_advantages over its own forward's
    log-probs, and fills shaping's rewards, kl and flat in."""
    world, device = accelerator.num_processes, accelerator.device
    _, per_minibatch, _ = cfg.sizes(world)
    mode = LOSS_TYPES[cfg.loss_type]
    # GRPO's KL is a loss term (k3, Eq. 4); with kl_in_reward it is already in the reward (stage 4).
    kl_coef = 0.0 if cfg.kl_in_reward else cfg.beta
    sums = defaultdict(float)
    # One minibatch's update sums over all its responses whatever their order, so whole groups in
    # each micro-batch change only rounding there, and let prefix sharing compute a prompt once.
    whole_groups = shaping is not None or (cfg.prefix_sharing and cfg.num_minibatches == 1)
    for _ in range(cfg.num_iterations):
        if not whole_groups:
            order = torch.randperm(len(gen.responses))
        else:
            k = cfg.num_generations
            order = (torch.randperm(len(gen.responses) // k)[:, None] * k + torch.arange(k)).flatten()
        for start in range(0, len(order), per_minibatch):
            rows_of_minibatch = order[start: start + per_minibatch]
            mask_all = gen.response_mask[rows_of_minibatch]
            count = int(aggregate_count(mask_all, mode))
            if cfg.loss_type == "dr_grpo":
                count = len(rows_of_minibatch) * cfg.max_new_tokens
            normalizer = max(global_sum(accelerator, count), 1) / world
            micro = rows_of_minibatch.split(cfg.batch_size)
            with weights_cast_once(accelerator, model):
                for i, rows in enumerate(micro):
                    part = gen.select(rows)
                    mask = part.response_mask.to(device)
                    with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model):
                        logprobs = response_logprobs_of(model, part, cfg, device)
                        old_rows = logprobs.detach() if old is None else old[rows].to(device)
                        if shaping is None:
                            rows_advantages = advantages[rows]
                        else:
                            rewards, kl, rows_advantages, flat = shaped_advantages(shaping.scores[rows], part,
                                                                                   old_rows.cpu(), ref[rows], cfg)
                            shaping.rewards[rows], shaping.kl[rows], shaping.flat[rows] = rewards, kl, flat
                        ref_rows = ref[rows].to(device) if kl_coef > 0 else None
                        loss, stats = grpo_loss(logprobs, old_rows, rows_advantages.to(device), mask, ref_rows,
                                                clip_eps=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, beta=kl_coef)
                        accelerator.backward(aggregate(loss, mask, mode, normalizer=normalizer))
                    n = int(mask.sum())
                    sums["loss/policy"] += float(masked_sum(loss.detach(), mask))
                    # The loss's statistics are logged under their own names (token means, summed here).
                    for key, value in stats.items():
                        sums[key] += float(value) * n
                    sums["tokens"] += n
            grad_norm = guard.apply(accelerator, model, optimizer, cfg.max_grad_norm, step=step, batch=batch)
            if cfg.max_grad_norm > 0:
                sums["optim/grad_norm"] += grad_norm
            sums["steps"] += 1
    totals = {key: global_sum(accelerator, value) for key, value in sums.items()}
    stats = {key: value / max(totals["tokens"], 1) for key, value in totals.items()
             if key not in ("tokens", "steps", "optim/grad_norm")}
    if cfg.max_grad_norm > 0:
        # Every process holds the same (all-reduced) norm, so the global sum counts it world times.
        stats["optim/grad_norm"] = totals["optim/grad_norm"] / world / totals["steps"]
    return stats


@torch.no_grad()
def evaluate(net, reference, sampler, prompts, reward, cfg: GRPOConfig, accelerator) -> dict:
    """Mean reward, KL to the reference (Σ_t log π/π_ref per response, k1: unbiased under π)
    and response length of one response per held-out prompt, sampled as in training from a
    fixed seed so evaluations differ only by the policy."""
    mine, real = padded_share(list(range(len(prompts))), accelerator)
    params = replace(sampling_params(cfg, -1), n=1)
    totals = defaultdict(float)
    for start in range(0, len(mine), cfg.rollout_batch_size):
        gen = generate(sampler, prompts, mine[start: start + cfg.rollout_batch_size], params)
        forward = logprobs_of(net, reference, gen, cfg, accelerator, old=True, ref=True)
        counted = slice(0, max(real - start, 0))  # one response per prompt; the rest is padding
        mask = gen.response_mask[counted]
        totals["eval/scores"] += float(reward(gen, prompts)[0][counted].sum())
        totals["eval/kl"] += float(masked_sum(forward["old"][counted] - forward["ref"][counted], mask))
        totals["eval/response_length"] += float(mask.sum())
    return {key: global_sum(accelerator, value) / len(prompts) for key, value in totals.items()}


def write_samples(path: Path, step: int, gen: Generation, rewards: torch.Tensor) -> None:
    with path.open("a") as f:
        for i in range(min(SAMPLES_PER_LOG, len(gen.responses))):
            f.write(json.dumps({"step": step, "prompt": gen.prompts[i], "response": gen.responses[i],
                                "reward": float(rewards[i]), "finish_reason": gen.finish_reasons[i]}) + "\n")


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO / RLOO as configured; returns the folder holding the final policy."""
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    local_prompts = cfg.sizes(world)[0]
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # Data and judges are checked before the output folder is touched.
    prompts, report = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_length,
                                   skip_invalid=cfg.skip_invalid)
    accelerator.print(report.summary())
    eval_prompts = []
    if cfg.eval_data:
        eval_prompts, report = load_prompts(cfg.eval_data, tokenizer, max_prompt_length=cfg.max_length,
                                            skip_invalid=cfg.skip_invalid)
        accelerator.print(report.summary())
    reward = build_reward(cfg, tokenizer, accelerator)
    fingerprint = check_output_dir(cfg, accelerator.num_processes)
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
    prepare_output_dir(accelerator, cfg, fingerprint)
    start = resume_from_checkpoint(accelerator, cfg)["step"] if cfg.resume else 0
    # A sharded policy is gathered whole on every process for the sampler's copy (`whole`).
    whole = whole_copy(accelerator, model)
    sampler = Sampler(whole.policy, tokenizer, precision=cfg.precision,
                      batch_size=local_prompts * cfg.num_generations)
    # log π_old is needed to reuse responses (the ratio) and for the KL-shaped reward, unless
    # stage 6 gives it; else the first pass's ratio is 1 by construction and the forward is skipped.
    in_training = shaped_in_training(cfg)
    needs_old = (cfg.num_iterations > 1 or cfg.num_minibatches > 1 or cfg.kl_in_reward) and not in_training
    command = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    accelerator.print(f"advantage {cfg.advantage}, loss {cfg.loss_type}, beta {cfg.beta}, "
                      f"prefix sharing: {cfg.prefix_sharing}")
    guard = NonFiniteGuard(cfg, command)
    log = RunLog(accelerator, cfg, iterations, start, command)
    samples_path = Path(cfg.output_dir) / "samples.jsonl"
    evaluate_now = partial(evaluate, net, reference, sampler, eval_prompts, reward, cfg, accelerator)
    if eval_prompts and start == 0:
        log.log(0, evaluate_now())
    stop = StopRequest(accelerator, cfg, command, optimizer)
    with stop.installed():
        for it in range(start, iterations):
            began = time.perf_counter()
            indices = step_items(it, len(prompts), cfg.rollout_batch_size, cfg.seed)[rank * local_prompts:
                                                                                     (rank + 1) * local_prompts]
            # 1. Generate K responses per prompt.
            gen = generate(sampler, prompts, indices, sampling_params(cfg, it))
            # 2. Score.
            scores, judge_means = reward(gen, prompts)
            # 3. Old policy and reference log-probs.
            forward = logprobs_of(net, reference, gen, cfg, accelerator, old=needs_old, ref=cfg.beta > 0)
            # 4–5. Rewards (missing-EOS penalty, the KL-shaped reward with kl_in_reward) and
            #      group-relative advantages, the same for every token of a response; in stage 6
            #      when shaped_in_training.
            shaping, token_advantages = (InTrainingShaping.of(scores) if in_training else None), None
            if shaping is None:
                rewards, kl, token_advantages, flat = shaped_advantages(scores, gen, forward.get("old"),
                                                                        forward.get("ref"), cfg)
            rolled = time.perf_counter()
            # 6. Policy epochs.
            stats = policy_epochs(model, optimizer, accelerator, gen, token_advantages, forward.get("old"),
                                  forward.get("ref"), cfg, guard=guard, step=it + 1,
                                  batch=batch_records(prompts, indices, cfg.data), shaping=shaping)
            if shaping is not None:
                rewards, kl, flat = shaping.rewards, shaping.kl, shaping.flat
            scheduler.step()
            refresh(whole, model)
            sampler.sync()
            done, now = it + 1, time.perf_counter()
            stop.step_done(done)
            n = global_sum(accelerator, len(gen.responses))
            metrics = {"objective/scores": global_sum(accelerator, float(scores.sum())) / n,
                       "objective/rewards": global_sum(accelerator, float(rewards.sum())) / n,
                       "objective/missing_eos": global_sum(accelerator, float((~gen.ended).sum())) / n,
                       "objective/zero_variance_groups": global_sum(accelerator, float(flat.sum())) / n,
                       "rollout/response_length": global_sum(accelerator, float(gen.response_mask.sum())) / n,
                       **{key: global_sum(accelerator, value) / world for key, value in judge_means.items()},
                       **stats, "time/rollout": rolled - began, "time/update": now - rolled,
                       "perf/episodes_per_s": cfg.rollout_batch_size * cfg.num_generations / (now - began),
                       "optim/lr": scheduler.get_last_lr()[0], **guard.metrics()}
            if kl is not None:
                metrics["objective/kl"] = global_sum(accelerator, float(kl.sum())) / n
            if done % cfg.logging_steps == 0 or done == iterations:
                log.log(done, metrics)
            log.progress(1, {"reward": f"{metrics['objective/rewards']:.3f}"})
            if accelerator.is_main_process and cfg.samples_steps and done % cfg.samples_steps == 0:
                write_samples(samples_path, done, gen, rewards)
            if eval_prompts and cfg.eval_steps and done % cfg.eval_steps == 0 and done < iterations:
                log.log(done, evaluate_now())
            if cfg.save_steps and done % cfg.save_steps == 0 and done < iterations:
                save_checkpoint(accelerator, cfg, done)
            if stop.signum is not None:
                checkpoint_and_exit(accelerator, cfg, log, done, command, stop.signum)

    if eval_prompts:
        log.log(iterations, evaluate_now())

    guard.check_weights(model)
    final = full_model(accelerator, model)  # every process: a sharded model is gathered here

    def save(out: Path) -> None:
        save_model(final.policy, tokenizer, out, merge_lora=cfg.merge_lora)

    return finish_run(accelerator, cfg, log, save, "policy", step=iterations, command=command)
