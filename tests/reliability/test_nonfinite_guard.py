"""A trainer never applies a non-finite update nor saves non-finite weights (issue 15, §1)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from posttrain.config import DPOConfig, build_config
from posttrain.data.errors import RecordError
from posttrain.data.formats import preference_pairs
from posttrain.losses.dpo import DPO_LOSSES
from posttrain.trainers import dpo
from posttrain.trainers.common import MAX_SKIPPED_IN_A_ROW, NonFiniteError, NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_margin_beyond_float32_is_refused_naming_the_record():
    # 1e308 is finite in JSON and Python, and inf as a float32 tensor (loss/train: Infinity).
    with pytest.raises(RecordError, match=r"^d\.jsonl: record 5: field 'margin': expected a finite number, got "
                                          r"number 1e\+308 \(beyond float32's"):
        preference_pairs({"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1e308}, source="d.jsonl", index=4)
    assert preference_pairs({"prompt": "a", "chosen": "b", "rejected": "c", "margin": 3e38},
                            source="d.jsonl", index=4)[0].margin == 3e38


def test_guard_skips_a_non_finite_update_and_stops_after_several(tmp_path):
    cfg = replace(build_config(DPOConfig, None, dict(model="tiny-random", data="d.jsonl")), output_dir=str(tmp_path))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard, accelerator = NonFiniteGuard(cfg, "dpo"), Accelerator(cpu=True)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(1, MAX_SKIPPED_IN_A_ROW):
        model(torch.tensor([[float("nan"), 1.0]])).sum().backward()
        assert math.isnan(guard.apply(accelerator, model, optimizer, 1.0, step=step, batch="records [7] of d"))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())
    assert guard.metrics() == {"train/skipped_steps": MAX_SKIPPED_IN_A_ROW - 1}
    model(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    with pytest.raises(NonFiniteError, match=rf"^step 9: {MAX_SKIPPED_IN_A_ROW} updates in a row had a non-finite "
                                             r"gradient .*records \[7\] of d.*Last good checkpoint: none"):
        guard.apply(accelerator, model, optimizer, 0.0, step=9, batch="records [7] of d")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"parameter bias holds NaN or ±inf; the final model was not saved"):
        guard.check_weights(model)


def pairs_file(tmp_path: Path, n: int = 8) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w + w}) + "\n"
                            for w in words))
    return path


def poisoned(spec, bad_calls: set[int]):
    """The sigmoid loss, NaN on the listed calls (1-based): a NaN gradient reaches every weight."""
    calls = []

    def fn(*args, **kw):
        calls.append(1)
        loss, chosen, rejected = spec.fn(*args, **kw)
        return (loss * float("nan") if len(calls) in bad_calls else loss), chosen, rejected
    return replace(spec, fn=fn)


def config(tmp_path: Path, steps: int) -> DPOConfig:
    return build_config(DPOConfig, None, dict(model="tiny-random", data=str(pairs_file(tmp_path)), precision="fp32",
                                              output_dir=str(tmp_path / "out"), lr=1e-3, max_length=64,
                                              max_steps=steps, batch_size=4, logging_steps=1))


def test_dpo_skips_one_nan_step_logs_it_and_saves_finite_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(dpo.DPO_LOSSES, "sigmoid", poisoned(DPO_LOSSES["sigmoid"], {2}))
    out = dpo.train(config(tmp_path, 3))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1]
    assert math.isnan(rows[1]["optim/grad_norm"]) and math.isfinite(rows[2]["optim/grad_norm"])
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


def test_dpo_stops_when_every_step_is_nan_and_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(dpo.DPO_LOSSES, "sigmoid", poisoned(DPO_LOSSES["sigmoid"], set(range(1, 100))))
    with pytest.raises(NonFiniteError, match=rf"^step {MAX_SKIPPED_IN_A_ROW}: .* on records \[.*\] of .*pairs\.jsonl"):
        dpo.train(config(tmp_path, 5))
    assert not (tmp_path / "out" / "model.safetensors").exists()
