"""The worked example end to end: country names and their translations from pycountry's
gettext catalogues (examples/make_translation_data.py) → `posttrain data template --task
translation` → at least 1,000 instruction pairs → a short `posttrain sft` on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data import load_sft_examples
from posttrain.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_country_name_translations_become_instruction_pairs_and_train(tmp_path, capsys):
    pytest.importorskip("pycountry")
    example = load_example("make_translation_data")
    countries, pairs, model = tmp_path / "countries.jsonl", tmp_path / "translation_sft.jsonl", tmp_path / "model"
    example.main([str(countries)])
    records = [json.loads(line) for line in countries.read_text(encoding="utf-8").splitlines()]
    # Real translations, both ways: Germany is Deutschland in the German catalogue.
    assert {"source_language": "English", "target_language": "German", "source": "Germany",
            "target": "Deutschland", "country": "DE"} in records
    assert all(r["source"] != r["target"] for r in records)

    assert main(["data", "template", "--source", str(countries), "--task", "translation", "--seed", "0",
                 "--output", str(pairs)]) == 0
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(records) >= 1000
    for row in rows:
        record = records[row["template"]["source_index"]]
        assert record["source"] in row["prompt"] and record["target_language"] in row["prompt"]
        assert record["target"] in row["completion"]
    assert len(Counter(r["template"]["id"] for r in rows)) == 7

    # Every pair is a valid SFT record that fits the trainer's default length (the tiny
    # tokenizer spends about a token per byte).
    _, report = load_sft_examples(pairs, build_tiny_tokenizer(), max_length=512)
    assert report.loaded == len(rows) and not (report.invalid or report.truncated or report.dropped)
    assert main(["sft", "--model", "tiny-random", "--data", str(pairs), "--max-steps", "2", "--batch-size", "2",
                 "--precision", "fp32", "--output-dir", str(model)]) == 0
    assert (model / "config.json").exists()
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    losses = [v for m in metrics for k, v in m.items() if k.startswith("loss")]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses)
