"""`posttrain sample`: the samples file, continuing after an interruption, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--model", "tiny-random", "--n", "2", "--max-new-tokens", "24", "--precision", "fp32", "--batch-size", "4"]


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question number {i}", "id": i}) + "\n" for i in range(count)))
    return path


def test_sample_writes_n_responses_and_provenance_per_prompt(tmp_path, capsys):
    data = write_prompts(tmp_path / "prompts.jsonl", 5)
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS, "--stop-strings", "a|b"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]            # the source record's fields stay
    for record in records:
        assert len(record["responses"]) == 2 and len(record["finish_reasons"]) == 2
        assert set(record["finish_reasons"]) <= {"eos", "stop", "length"}
        assert record["sampling"] == {"model": "tiny-random", "n": 2, "max_new_tokens": 24, "temperature": 1.0,
                                      "top_p": 1.0, "top_k": 0, "stop_strings": ["a", "b"], "seed": 0,
                                      "precision": "fp32"}
    # Run again: nothing to do, the file is unchanged.
    before = out.read_bytes()
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS, "--stop-strings", "a|b"]) == 0
    assert out.read_bytes() == before and "already sampled" in capsys.readouterr().err


def test_sigterm_then_rerun_gives_the_uninterrupted_file(tmp_path, spawn):
    data = write_prompts(tmp_path / "prompts.jsonl", 240)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert main(["sample", "--data", str(data), "--output", str(whole), *ARGS]) == 0
    command = [sys.executable, "-m", "posttrain.cli", "sample", "--data", str(data), "--output", str(resumed), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (resumed.exists() and resumed.read_text().count("\n") >= 8):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "re-run the same command to continue" in err
    written = resumed.read_text().count("\n")
    assert 8 <= written < 240
    # A run killed in the middle of a write leaves a partial line; the re-run drops it.
    with resumed.open("a") as f:
        f.write('{"prompt": "question number')
    assert main(["sample", "--data", str(data), "--output", str(resumed), *ARGS]) == 0
    assert resumed.read_bytes() == whole.read_bytes()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("posttrain sample: error: ")
    return err[-1]


@pytest.mark.parametrize("records, extra, message", [
    ([{"prompt": "ok"}, {"prompt": ""}], [], "record 2: field 'prompt'"),
    ([{"prompt": "ok"}, {"text": "no prompt"}], [], "record 2"),
    ([{"prompt": "ok"}], ["--n", "0"], "n=0 must be ≥ 1"),
    ([{"prompt": "ok"}], ["--top-p", "1.5"], "top_p=1.5"),
    ([{"prompt": "ok"}], ["--batch-size", "0"], "--batch-size=0"),
    ([{"prompt": "ok"}], ["--temperature", "inf"], "temperature=inf must be finite"),
    ([{"prompt": "ok"}], ["--max-prompt-length", "0"], "--max-prompt-length=0 must be ≥ 1"),
    ([{"prompt": "ok"}], ["--max-prompt-length", "200000"], "passes the 2048 positions of tiny-random"),
    ([{"prompt": "ok"}, {"prompt": "bad \ud800 text"}], [], "record 2: field 'prompt': contains '\\ud800' at "
     "character 4, a lone surrogate"),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, capsys, records, extra, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS, *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_an_existing_file_of_other_settings_or_prompts_is_refused_untouched(tmp_path, capsys):
    data = write_prompts(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS]) == 0
    before = out.read_bytes() + b'{"cut sh'
    out.write_bytes(before)
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS, "--temperature", "0.5"]) == 2
    assert "field 'sampling.temperature' is 1.0, this run has 0.5" in one_line_error(capsys)
    write_prompts(data, 2)
    data.write_text(data.read_text().replace("question number 1", "another question"))
    assert main(["sample", "--data", str(data), "--output", str(out), *ARGS]) == 2
    assert "line 2: field 'prompt_index' 1 names no such prompt" in one_line_error(capsys)
    assert out.read_bytes() == before                                  # not even the partial line removed
    assert main(["sample", "--data", str(data), "--output", str(data), *ARGS]) == 2
    assert "is the prompt file itself" in one_line_error(capsys)
    assert main(["sample", "--data", str(data), "--output", str(tmp_path / "no" / "x.jsonl"), *ARGS]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(["sample", "--data", str(data), "--output", str(tmp_path), *ARGS]) == 2
    assert "is a folder" in one_line_error(capsys)
