"""The README's main job: the embedded model's answer, a short instruction tuning on the
shipped instruction set, and the answer again, with wall times."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.config import SFTConfig, build_config
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.generate import chat_generate
from posttrain.models.precision import resolve_precision

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
PROMPT = "Explain the moon landing to a 6 year old in a few sentences."


def answer(model_path: str, precision: str) -> str:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    return chat_generate(model, tokenizer, [PROMPT], max_new_tokens=96, precision=precision)[0]


def run(args) -> None:
    from posttrain.trainers import sft

    data = EXAMPLES / "instructions.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data}: the demo's instruction set ships with the posttrain repository; "
                                "run the demo from a clone, or use `posttrain sft --data FILE`")
    precision = resolve_precision(args.precision)
    start = time.perf_counter()
    print(f"== {args.model}, before instruction tuning ({precision}) ==\n### {PROMPT}\n"
          f"{answer(args.model, precision)}\n", flush=True)
    cfg = build_config(SFTConfig, None, {
        "model": args.model, "data": str(data), "eval_data": str(EXAMPLES / "instructions_eval.jsonl"),
        "output_dir": str(Path(args.output_dir) / "sft"), "max_steps": args.max_steps, "batch_size": 4,
        "lr": 3e-5, "max_length": 256, "precision": args.precision, "logging_steps": 5,
        "warmup_ratio": 0.1, "resume": False})
    tuned = sft.train(cfg)
    print(f"\n== after {args.max_steps} SFT steps ==\n### {PROMPT}\n{answer(str(tuned), precision)}\n")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; tuned model in {tuned}")
