"""`posttrain annotate serve | add-annotator | status | export` through posttrain.cli.main:
links, idempotent loading and the load summary, the off-loopback warning, errors that leave
nothing behind, and export → `posttrain rm` / `posttrain kto` training on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import waitress
from annotate_helpers import clients, make_db, read_jsonl, write_jsonl

from posttrain.annotate.storage import AnnotationDB
from posttrain.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = [
    {"prompt": "upper: abc", "responses": ["ABC", "abc", "Abc"], "finish_reasons": ["eos"] * 3, "prompt_index": 0},
    {"prompt": "lower: XYZ", "responses": ["xyz", "XYZ"], "finish_reasons": ["eos", "eos"], "prompt_index": 1},
    {"prompt": "upper: q", "responses": ["Q", ""], "finish_reasons": ["eos", "eos"], "prompt_index": 2},
]


class FakeServer:
    """Stands in for waitress's server: records how it was made, serves nothing."""

    made: list[dict] = []
    effective_port = 4321

    def __init__(self, app, **kw):
        FakeServer.made.append({"app": app, **kw})

    def run(self):
        pass

    def close(self):
        pass


@pytest.fixture
def fake_waitress(monkeypatch):
    FakeServer.made = []
    monkeypatch.setattr(waitress, "create_server", FakeServer)
    return FakeServer.made


def test_add_annotator_prints_a_personal_link(tmp_path, capsys):
    db = tmp_path / "a.sqlite"
    assert main(["annotate", "add-annotator", "ann", "--db", str(db), "--url", "http://box:9000/"]) == 0
    link = capsys.readouterr().out.strip()
    token = re.fullmatch(r"ann: http://box:9000/\?token=([A-Za-z0-9_-]{32})", link).group(1)
    assert AnnotationDB(db).annotator_for_token(token).name == "ann"
    assert main(["annotate", "add-annotator", "ann", "--db", str(db)]) == 2
    assert "annotate: error: annotator 'ann' already exists" in capsys.readouterr().err
    assert main(["annotate", "add-annotator", "ann", "--db", str(db), "--new-token"]) == 0
    assert AnnotationDB(db).annotator_for_token(token) is None


def test_serve_loads_once_binds_loopback_and_warns_otherwise(tmp_path, capsys, fake_waitress):
    data, db = write_jsonl(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "a.sqlite"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--per-item", "2"]) == 0
    out, err = capsys.readouterr()
    assert (f"{data}: read 3 records, formed 4 items (4 new, 0 already loaded); skipped 1 prompts (1 with fewer than 2 "
            "usable responses); left out 1 empty responses") in out
    assert "serving 4 pair-mode items, 2 label(s) each, at http://127.0.0.1:4321/ for 0 annotator(s)" in out
    assert "no annotators yet: add one with `posttrain annotate add-annotator NAME" in out
    assert "warning" not in err
    assert fake_waitress[0]["host"] == "127.0.0.1" and fake_waitress[0]["port"] == 8080
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    assert "formed 4 items (0 new, 4 already loaded)" in out and "2 label(s) each" in out   # --per-item remembered
    assert "warning: --host 0.0.0.0 is not a loopback address" in err
    assert main(["annotate", "serve", "--db", str(db), "--host", "::1"]) == 0          # no --data: the items held
    out, err = capsys.readouterr()
    assert "at http://[::1]:4321/" in out and "warning" not in err
    assert AnnotationDB(db).item_count() == 4


@pytest.mark.parametrize("args, message", [
    (["--per-item", "0"], "--per-item 0: expected ≥ 1"),
    (["--port", "70000"], "--port 70000: expected 0-65535"),
    (["--pairs-per-prompt", "-2"], "--pairs-per-prompt -2"),
    (["--data", "BAD"], "bad.jsonl: record 2: field 'responses': expected a list of strings"),
    (["--data", "MISSING"], "missing.jsonl: no such file"),
    ([], "no such file; pass --data to create it"),
])
def test_serve_errors_leave_no_database(tmp_path, capsys, fake_waitress, args, message):
    write_jsonl(tmp_path / "bad.jsonl", [SAMPLES[0], {"prompt": "x", "responses": "xy"}])
    good = write_jsonl(tmp_path / "good.jsonl", SAMPLES)
    paths = {"BAD": str(tmp_path / "bad.jsonl"), "MISSING": str(tmp_path / "missing.jsonl")}
    args = [paths.get(a, a) for a in args]
    if "--data" not in args:
        args += ["--data", str(good)] if args else []
    db = tmp_path / "a.sqlite"
    assert main(["annotate", "serve", "--db", str(db), *args]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists() and not fake_waitress


def test_serve_refuses_the_other_mode_and_a_file_that_forms_nothing(tmp_path, capsys, fake_waitress):
    data, db = write_jsonl(tmp_path / "s.jsonl", SAMPLES), tmp_path / "a.sqlite"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data)]) == 0
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--mode", "single"]) == 2
    assert "holds pair-mode items; this run asked for --mode single" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "responses": ["a", " "]}])
    assert main(["annotate", "serve", "--db", str(tmp_path / "b.sqlite"), "--data", str(empty)]) == 2
    assert "no items to annotate (" in capsys.readouterr().err
    assert len(fake_waitress) == 1


def label_everything(db: AnnotationDB, tokens: dict[str, str], pick) -> None:
    """Every annotator labels every item they are given, choosing pick(item) on screen."""
    for name, client in clients(db, tokens, per_item=len(tokens)).items():
        while (item := client.next()) is not None:
            assert client.label(item["id"], pick(item), f"{name}-{item['id']:06d}").status_code == 200


def obeys(prompt: str, reply: str) -> bool:
    return reply == (reply.upper() if prompt.startswith("upper") else reply.lower())


def test_status_prints_progress_agreement_and_shares(tmp_path, capsys):
    db, tokens = make_db(tmp_path, SAMPLES, names=("ann", "bob"))

    def pick(item):
        left_ok = obeys(item["prompt"][0]["content"], item["left"][0]["content"])
        right_ok = obeys(item["prompt"][0]["content"], item["right"][0]["content"])
        return "tie" if left_ok == right_ok else "left" if left_ok else "right"

    label_everything(db, tokens, pick)
    db.set_per_item(2)
    assert main(["annotate", "status", "--db", str(db.path)]) == 0
    out = capsys.readouterr().out
    # 4 items, both annotators label each alike: raw agreement 100%; 2 of 8 labels are ties
    # (abc vs Abc, both wrong for "upper"), none both bad; each right reply came first in its sample.
    assert "items: 4 — 4 complete, 0 started, 0 unlabelled" in out
    assert "labels: 8 — first 6, second 0, tie 2, both_bad 0" in out
    assert "share of ties: 25.0%, of both bad: 0.0%" in out
    assert "per annotator: ann 4, bob 4" in out
    assert "agreement on 4 items labelled more than once: raw 100.0% of 4 label pairs; Cohen's kappa 1.000" in out
    assert main(["annotate", "status", "--db", str(db.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agreement"]["kappa"] == pytest.approx(1.0)
    assert main(["annotate", "status", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_export_is_read_unchanged_by_posttrain_rm(tmp_path, capsys, tiny_path):
    db, tokens = make_db(tmp_path, SAMPLES, names=("ann",))

    def pick(item):
        prompt = item["prompt"][0]["content"]
        left_ok, right_ok = (obeys(prompt, item[side][0]["content"]) for side in ("left", "right"))
        return "both_bad" if not (left_ok or right_ok) else "left" if left_ok else "right"

    label_everything(db, tokens, pick)
    out = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(out)]) == 0
    assert f"wrote 3 records to {out} from 4 items (majority vote); left out 1 both bad by majority" in \
        capsys.readouterr().out
    records = read_jsonl(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        ("upper: abc", "ABC", "abc"), ("upper: abc", "ABC", "Abc"), ("lower: XYZ", "xyz", "XYZ")]
    assert records[0]["annotation"]["votes"] == {"chosen": 1, "rejected": 0, "tie": 0, "both_bad": 0}
    run = tmp_path / "rm"
    assert main(["rm", "--model", "tiny-random", "--data", str(out), "--output-dir", str(run), "--max-steps", "2",
                 "--batch-size", "2", "--precision", "fp32", "--max-length", "64"]) == 0
    assert (run / "model.safetensors").is_file()
    assert all(row["loss"] == row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in row)


def test_single_mode_export_is_read_by_posttrain_kto(tmp_path, capsys, tiny_path):
    db, tokens = make_db(tmp_path, SAMPLES, mode="single", names=("ann",))
    label_everything(db, tokens, lambda item: "good" if obeys(item["prompt"][0]["content"],
                                                             item["response"][0]["content"]) else "bad")
    out = tmp_path / "kto.jsonl"
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(out)]) == 0
    records = read_jsonl(out)
    assert [(r["completion"], r["label"]) for r in records] == [
        ("ABC", True), ("abc", False), ("Abc", False), ("xyz", True), ("XYZ", False), ("Q", True)]
    assert main(["kto", "--model", "tiny-random", "--data", str(out), "--output-dir", str(tmp_path / "kto"),
                 "--max-steps", "1", "--batch-size", "2", "--precision", "fp32", "--max-length", "64"]) == 0


def test_export_errors_write_nothing(tmp_path, capsys):
    db, _ = make_db(tmp_path, SAMPLES)
    out = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(out)]) == 2
    assert f"no record to export (left out 4 unlabelled); {out} not written" in capsys.readouterr().err
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(tmp_path / "no" / "p.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(db.path)]) == 2
    assert "is the input file itself" in capsys.readouterr().err
    assert not out.exists()
    assert not list(Path(tmp_path).glob(".prefs*"))
