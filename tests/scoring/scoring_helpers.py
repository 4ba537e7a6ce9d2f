"""Helpers shared by the scoring tests: a samples file's records, JSONL files, and a
Generation built by hand (so each test knows exactly which tokens were "sampled")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.data import tokenize_prompt
from posttrain.sampling.generation import Generation

SAMPLES = [
    {"prompt": "List three fruits.", "responses": ["Apple, banana, and", "Apple, banana, cherry.", "Pears"],
     "finish_reasons": ["length", "eos", "eos"], "id": 0, "sampling": {"n": 3}},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
     "responses": ["hi", "Hello there, friend!"], "id": 1},
    {"messages": [{"role": "user", "content": "upper: abc"}], "responses": ["ABC", "abc", "Abc"],
     "finish_reasons": ["eos", "stop", "eos"], "id": 2},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generation(tokenizer, rows: list[tuple[str, str, str]]) -> Generation:
    """A Generation of rows (user prompt, reply text, finish reason): prompts left-padded,
    replies right-padded, the policy's EOS appended to the "eos" rows only."""
    prompts = [tokenize_prompt([{"role": "user", "content": p}], tokenizer) for p, _, _ in rows]
    replies = [tokenizer.encode(r, add_special_tokens=False) + ([tokenizer.eos_token_id] if why == "eos" else [])
               for _, r, why in rows]
    b, q, a, pad = len(rows), max(map(len, prompts)), max(map(len, replies)), tokenizer.pad_token_id
    prompt_ids, prompt_mask = torch.full((b, q), pad), torch.zeros((b, q), dtype=torch.bool)
    response_ids, response_mask = torch.full((b, a), pad), torch.zeros((b, a), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        prompt_ids[i, q - len(p):], prompt_mask[i, q - len(p):] = torch.tensor(p), True
        response_ids[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), True
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(b, a),
                      [why for _, _, why in rows], torch.arange(b), torch.zeros(b, dtype=torch.long),
                      [p for p, _, _ in rows], [r for _, r, _ in rows])
