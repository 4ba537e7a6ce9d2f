"""The README's main job, on the embedded model and the shipped example data:

  0. the starting model's answers;
  1. instruction tuning (SFT) on examples/data/instructions.jsonl;
  2. a reward model (Bradley–Terry) trained from the SFT model on examples/data/preferences.jsonl;
  3. DPO from the SFT model on the same preferences;
  4. RLHF with PPO from the SFT model on examples/data/prompts.jsonl, rewarded by that reward
     model (its critic starts from it too);
  5. evaluation: each model's greedy answers to held-out prompts, scored by the reward model.

Each stage is an ordinary trainer call with a small step budget, so the whole job stays
within minutes on 2 CPU cores; the same commands scale up with bigger budgets.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


from posttrain.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, build_config
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.sampling import Generation, SamplingParams, chat_generation
from posttrain.models.precision import resolve_precision

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
PROMPT = "Explain the moon landing to a 6 year old in a few sentences."
HELD_OUT = 4
"""Prompts from examples/data/prompts.jsonl added to PROMPT for the final comparison."""


def answers(model_path: str, prompts: list[str], precision: str) -> Generation:
    """Greedy replies of up to 96 tokens."""
    return chat_generation(load_causal_lm(model_path), load_tokenizer(model_path), prompts,
                           SamplingParams(temperature=0.0, max_new_tokens=96), precision=precision)


def shipped(name: str) -> str:
    path = EXAMPLES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's data ships with the posttrain repository; run the "
                                "demo from a clone, or call the trainers with your own --data")
    return str(path)


def run(args) -> None:
    from posttrain.scoring import load_scorer
    from posttrain.trainers import dpo, ppo, reward, sft

    precision = resolve_precision(args.precision)
    out = Path(args.output_dir)
    common = {"precision": args.precision, "max_length": 256, "batch_size": 4, "logging_steps": 5,
              "warmup_ratio": 0.1, "resume": False}
    start = time.perf_counter()
    times = {}

    print(f"== 0. {args.model}, before post-training ({precision}) ==\n### {PROMPT}\n"
          f"{answers(args.model, [PROMPT], precision).responses[0].strip()}\n", flush=True)

    def stage(name: str, trainer, config_class, values: dict) -> Path:
        """Train one stage with the shared settings, timing it; returns its output folder."""
        t = time.perf_counter()
        folder = trainer.train(build_config(config_class, None, {
            **common, **values, "output_dir": str(out / name)}))
        times[name] = time.perf_counter() - t
        return folder

    tuned = stage("sft", sft, SFTConfig, {
        "model": args.model, "data": shipped("instructions.jsonl"),
        "eval_data": shipped("instructions_eval.jsonl"), "max_steps": args.max_steps, "lr": 3e-5})
    print(f"\n== 1. after {args.max_steps} SFT steps ==\n### {PROMPT}\n"
          f"{answers(str(tuned), [PROMPT], precision).responses[0].strip()}\n", flush=True)

    preferences = {"model": str(tuned), "data": shipped("preferences.jsonl"),
                   "eval_data": shipped("preferences_eval.jsonl")}
    rm_dir = stage("rm", reward, RMConfig, {**preferences, "max_steps": args.rm_steps, "lr": 2e-5})
    print(f"\n== 2. reward model after {args.rm_steps} steps: held-out pair accuracy "
          f"{last_metric(rm_dir, 'eval/accuracy'):.2f} ==\n", flush=True)

    aligned = stage("dpo", dpo, DPOConfig, {**preferences, "max_steps": args.dpo_steps, "lr": 5e-6, "beta": 0.1})
    # The last HELD_OUT prompts are kept out of PPO's rollouts for the comparison below.
    rlhf = stage("ppo", ppo, PPOConfig, {
        "model": str(tuned), "reward_model": str(rm_dir), "data": str(ppo_prompts(out)),
        "max_steps": args.ppo_steps, "rollout_batch_size": 4, "max_new_tokens": 48, "temperature": 0.7,
        "lr": 2e-6, "kl_coef": 0.05, "logging_steps": 1})

    # 5. Does each stage beat the one it started from? Greedy answers, scored by the RM.
    prompts = [PROMPT] + [json.loads(line)["prompt"] for line in read_lines(shipped("prompts.jsonl"))][-HELD_OUT:]
    judge = load_scorer(f"rm:{rm_dir}", precision=args.precision)
    rows = []
    for name, path in (("start", args.model), ("sft", str(tuned)), ("dpo", str(aligned)), ("ppo", str(rlhf))):
        gen = answers(path, prompts, precision)
        # A reply cut off at the length limit is scored where it was cut, as PPO scores it.
        scores = judge.score(prompts, gen.responses, finished=[r == "eos" for r in gen.finish_reasons])
        rows.append((name, statistics.mean(scores), scores))
        if name in ("dpo", "ppo"):
            stage, steps = (3, args.dpo_steps) if name == "dpo" else (4, args.ppo_steps)
            print(f"\n== {stage}. after {steps} {name.upper()} steps ==\n### {PROMPT}\n{gen.responses[0].strip()}\n")
    print(f"== 5. reward-model scores of greedy answers to {len(prompts)} prompts not trained on ==")
    for name, mean, scores in rows:
        print(f"{name:>5}: mean {mean:+.3f}  [{', '.join(f'{s:+.2f}' for s in scores)}]")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items())
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s ({spent}); models in {out}")


def read_lines(path: str) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def ppo_prompts(out: Path) -> Path:
    """examples/data/prompts.jsonl without its last HELD_OUT prompts (kept for evaluation)."""
    path = out / "ppo_prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in read_lines(shipped("prompts.jsonl"))[:-HELD_OUT]))
    return path


def last_metric(folder: Path, key: str) -> float:
    values = [row[key] for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
              if key in row]
    return values[-1]
