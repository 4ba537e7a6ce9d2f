"""examples/recipes/rejection_sampling.sh on the tiny model: two rounds of sample → judge →
best-of-n → SFT, the second starting from the first one's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # eight `posttrain` processes, about a minute on 2 busy cores
def test_two_rounds_each_starting_from_the_last_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "examples/data/arithmetic.jsonl").read_text().splitlines(True)[:4]))
    out = tmp_path / "rs"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "N": "2", "MAX_NEW_TOKENS": "8", "SFT_STEPS": "1", "PRECISION": "fp32",
           "SELECT": "--keep-cut-off"}  # the tiny model's replies mostly run to max_new_tokens
    result = subprocess.run(["bash", "examples/recipes/rejection_sampling.sh", "tiny-random", str(prompts),
                             "fn:examples.rewards:exact_match", str(out), "2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    models = []
    for round_ in (1, 2):
        folder = out / f"round{round_}"
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        models.append(samples[0]["sampling"]["model"])
        sft = [json.loads(line) for line in (folder / "sft.jsonl").read_text().splitlines()]
        assert 1 <= len(sft) <= 4 and all(r["best_of_n"]["rank"] == 1 for r in sft)
        assert (folder / "model" / "config.json").exists()
    assert models == ["tiny-random", str(out / "round1" / "model")]
    assert f"== the last round's model: {out / 'round2' / 'model'}" in result.stdout
