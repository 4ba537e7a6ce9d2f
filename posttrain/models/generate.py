"""Chat-formatted generation for looking at a model: the CLI's `generate` and the demo."""

from __future__ import annotations

import torch

from posttrain.models.precision import autocast


@torch.no_grad()
def chat_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, system: str | None = None,
                  precision: str = "fp32") -> list[str]:
    """Reply to each prompt as a single user turn; greedy when temperature is 0.

    Prompts are left-padded into one batch so every row's generation starts at the same
    column; the replies are decoded without special tokens.
    """
    conversations = [([{"role": "system", "content": system}] if system else [])
                     + [{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    was_training = model.training
    model.eval()
    with autocast(precision, device_type=model.device.type):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, top_k=None, **sampling)
    model.train(was_training)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
