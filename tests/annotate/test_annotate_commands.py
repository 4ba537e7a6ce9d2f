"""`posttrain annotate serve | add-annotator | status | export` through posttrain.cli.main:
links, idempotent loading and the load summary, the off-loopback warning, errors that leave
nothing behind, and export → `posttrain rm` / `posttrain kto` training on the tiny model."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import waitress
from annotate_helpers import REPO, clients, make_db, read_jsonl, write_jsonl

from posttrain.annotate.storage import AnnotationDB
from posttrain.cli import build_parser, main

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
        FakeServer.made.append({"app": app, "address": kw["sockets"][0].getsockname(), **kw})

    def run(self):
        pass

    def close(self):
        for sock in FakeServer.made[-1]["sockets"]:
            sock.close()


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
    assert "annotate add-annotator: error: annotator 'ann' already exists" in capsys.readouterr().err
    assert main(["annotate", "add-annotator", "ann", "--db", str(db), "--new-token"]) == 0
    assert AnnotationDB(db).annotator_for_token(token) is None


def test_serve_loads_once_binds_loopback_and_warns_otherwise(tmp_path, capsys, fake_waitress):
    data, db = write_jsonl(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "a.sqlite"
    assert build_parser().parse_args(["annotate", "serve", "--db", "x.sqlite"]).port == 8080
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--per-item", "2", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert (f"{data}: read 3 records, formed 4 items (4 new, 0 already loaded); skipped 1 prompt (1 with fewer than 2 "
            "usable responses); left out 1 empty response") in out
    assert "serving 4 pair-mode items, 2 labels each, at http://127.0.0.1:4321/ for 0 annotators" in out
    assert "no annotators yet: add one with `posttrain annotate add-annotator NAME" in out
    assert "warning" not in err
    assert fake_waitress[0]["address"][0] == "127.0.0.1"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "formed 4 items (0 new, 4 already loaded)" in out and "2 labels each" in out   # --per-item remembered
    assert "warning: --host 0.0.0.0 is not a loopback address" in err
    assert main(["annotate", "serve", "--db", str(db), "--host", "::1", "--port", "0"]) == 0   # no --data: items held
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


# ---- the fresh-user findings: nothing created or changed before everything is checked ----------


def test_serve_on_a_port_in_use_names_host_and_port_and_leaves_the_database_alone(tmp_path, capsys, fake_waitress):
    data = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        db = tmp_path / "pp.sqlite"
        assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--port", str(port)]) == 2
        assert (f"annotate serve: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in "
                "use); pick another --port (0: any free one)") in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == [data]   # no pp.sqlite, -wal or -shm
        # An existing database stays byte for byte as it was, though the file would add items to it.
        make_db(tmp_path, SAMPLES[:1])[0].close()
        before = (tmp_path / "a.sqlite").read_bytes()
        assert main(["annotate", "serve", "--db", str(tmp_path / "a.sqlite"), "--data", str(data), "--per-item", "3",
                     "--port", str(port)]) == 2
        assert (tmp_path / "a.sqlite").read_bytes() == before
        with AnnotationDB(tmp_path / "a.sqlite") as untouched:
            assert untouched.item_count() == 3 and untouched.per_item is None
    finally:
        taken.close()
    assert not fake_waitress


def test_serve_on_an_unknown_host_fails_before_warning_or_creating(tmp_path, capsys, fake_waitress):
    data, db = write_jsonl(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "pp.sqlite"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--host", "no.such.host.invalid"]) == 2
    err = capsys.readouterr().err
    assert "annotate serve: error: --host no.such.host.invalid: not an address this machine can resolve" in err
    assert "warning" not in err and not db.exists() and not fake_waitress


@pytest.mark.parametrize("records", [
    [{"prompt": "q1", "responses": ["only one"]}, {"prompt": "q2", "responses": ["just this"]}],
    [{"prompt": "q1", "responses": ["same", "same"]}, {"prompt": "q2", "responses": ["x", "x", "x"]}],
], ids=["one-response-per-prompt", "only-duplicates"])
def test_serve_a_file_that_forms_no_item_creates_no_database(tmp_path, capsys, fake_waitress, records):
    data, db = write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "pp.sqlite"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--port", "0"]) == 2
    assert f"--db {db}: no items to annotate ({data} formed none)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [data] and not fake_waitress


def test_a_load_that_fails_midway_removes_the_database_it_created(tmp_path, capsys, fake_waitress, monkeypatch):
    data, db = write_jsonl(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "pp.sqlite"

    def failing_add_items(self, items, mode, *, per_item=None):
        with self.write() as con:   # a write inside the load's transaction, then a failure: rolled back
            con.execute("INSERT INTO meta VALUES ('half-done', 'x')")
            raise ValueError("disk gone")

    existing, _ = make_db(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    existing.close()
    monkeypatch.setattr(AnnotationDB, "add_items", failing_add_items)
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--port", "0"]) == 2
    assert "error: disk gone" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [existing.path, data] and not fake_waitress
    # An existing database: the transaction is rolled back, the file stays as it was.
    before = existing.path.read_bytes()
    assert main(["annotate", "serve", "--db", str(existing.path), "--data", str(data), "--port", "0"]) == 2
    assert existing.path.read_bytes() == before
    with AnnotationDB(existing.path) as reopened:
        assert reopened.item_count() == 1 and reopened.read().execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 3


@pytest.mark.parametrize("records, message", [
    ([SAMPLES[0], {"prompt": "p", "chosen": "a", "rejected": "b"}],
     "mixed.jsonl: record 2: field 'chosen': a preference {prompt, chosen, rejected} record, but record 1 is a samples "
     "{prompt | messages, responses} record; put each kind in a file of its own"),
    ([{"messages": "hi", "responses": ["a", "b"]}],
     "mixed.jsonl: record 1: field 'messages': expected a list of {role, content} messages, got string 'hi'"),
])
def test_serve_refuses_mixed_record_kinds_and_a_string_messages(tmp_path, capsys, fake_waitress, records, message):
    data, db = write_jsonl(tmp_path / "mixed.jsonl", records), tmp_path / "pp.sqlite"
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--port", "0"]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists() and not fake_waitress


@pytest.mark.parametrize("url, message", [
    ("javascript:alert(1)", "--url 'javascript:alert(1)': expected http://HOST[:PORT] or https://HOST[:PORT]"),
    ("notaurl", "--url 'notaurl': expected http://HOST[:PORT] or https://HOST[:PORT]"),
    ("http://box:99999", "the port is not a number from 0 to 65535"),
    ("https://box/annotate?x=1", "with no path, query, fragment or user name"),
])
def test_add_annotator_refuses_a_url_that_is_not_a_server_root(tmp_path, capsys, url, message):
    db = tmp_path / "a.sqlite"
    assert main(["annotate", "add-annotator", "ann", "--db", str(db), "--url", url]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()
    assert main(["annotate", "add-annotator", "ann", "--db", str(db), "--url", "https://[::1]:8443/"]) == 0
    assert capsys.readouterr().out.startswith("ann: https://[::1]:8443/?token=")


def test_db_must_be_an_sqlite_file_or_a_new_name_that_says_so(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "adir").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["annotate", "add-annotator", "ann", "--db", "../samples.jsonl"]) == 2
    assert ("--db ../samples.jsonl: a new database's name must end in .sqlite, .sqlite3 or .db (so that a mistyped "
            "data file path does not become a database)") in capsys.readouterr().err
    assert not (tmp_path / "samples.jsonl").exists()
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    text = samples.read_text()
    assert main(["annotate", "add-annotator", "ann", "--db", "../samples.jsonl"]) == 2
    assert "--db ../samples.jsonl: not an SQLite database (it starts with b'{\"prompt\": \"uppe')" in \
        capsys.readouterr().err
    assert samples.read_text() == text
    assert main(["annotate", "add-annotator", "ann", "--db", "adir"]) == 2
    assert "--db adir: is a folder; expected an SQLite file, such as adir/annotations.sqlite" in capsys.readouterr().err
    assert main(["annotate", "serve", "--db", "adir", "--data", str(samples), "--port", "0"]) == 2
    assert "--db adir: is a folder" in capsys.readouterr().err
    for name in ("a.sqlite3", "b.db", "c.SQLITE"):
        assert main(["annotate", "add-annotator", "ann", "--db", name]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["a.sqlite3", "adir", "b.db", "c.SQLITE"]


def test_status_of_a_database_without_items_says_so_and_counts_read_in_the_singular(tmp_path, capsys, fake_waitress):
    db = tmp_path / "a.sqlite"
    assert main(["annotate", "add-annotator", "ann", "--db", str(db)]) == 0
    token = re.search(r"token=(\S+)", capsys.readouterr().out).group(1)
    assert main(["annotate", "status", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out == (f"{db}: no items yet (`posttrain annotate serve --db {db} --data FILE` loads them)\n"
                   "annotators: ann\n")
    assert main(["annotate", "status", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] is None
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert main(["annotate", "serve", "--db", str(db), "--data", str(data), "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{data}: read 1 record, formed 1 item (1 new, 0 already loaded)" in out
    assert "serving 1 pair-mode item, 1 label each, at http://127.0.0.1:4321/ for 1 annotator;" in out
    (client,) = clients(AnnotationDB(db), {"ann": token}).values()
    item = client.next()
    assert client.label(item["id"], "left", "submit-0001").status_code == 200
    assert main(["annotate", "status", "--db", str(db)]) == 0
    assert f"{db}: pair mode, 1 label wanted per item" in capsys.readouterr().out
    out_file = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db), "--output", str(out_file)]) == 0
    assert f"wrote 1 record to {out_file} from 1 item (majority vote)" in capsys.readouterr().out


def test_export_replaces_its_output_and_help_and_readme_say_so_and_explain_min_votes(tmp_path, capsys):
    db, tokens = make_db(tmp_path, SAMPLES, names=("ann", "bob"))
    label_everything(db, {"ann": tokens["ann"]}, lambda item: "left")   # one vote each, --per-item 2 wanted
    db.set_per_item(2)
    out = tmp_path / "prefs.jsonl"
    out.write_text("old contents\n")
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(out)]) == 0
    assert len(read_jsonl(out)) == 4                          # replaced; one-vote items exported by default
    assert main(["annotate", "export", "--db", str(db.path), "--output", str(out), "--min-votes", "2"]) == 2
    assert "no record to export (left out 4 with fewer than 2 votes)" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 4                          # an export that fails leaves the old file
    with pytest.raises(SystemExit):
        main(["annotate", "export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "an existing file is replaced (atomically: written aside, then renamed)" in help_text
    assert ("the default exports an item as soon as it has one, even if serve's --per- item wants more" in help_text
            or "even if serve's --per-item wants more" in help_text)
    readme = (REPO / "README.md").read_text()
    section = " ".join(readme[readme.index("## Human annotation"):].split("\n## ")[0].split())
    assert "`export` replaces an existing `--output` file (atomically" in section
    assert "`--min-votes K` leaves out items with fewer than K labels; it defaults to 1" in section
