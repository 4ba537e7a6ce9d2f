"""Items from data files, idempotent loading, annotators, Cohen's kappa and agreement by hand,
and the majority-vote export rules on a hand-labelled database."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from annotate_helpers import make_db, pair_records

from posttrain.annotate.items import choose_pairs, items_from_records
from posttrain.annotate.results import agreement, cohens_kappa, export_records, plurality, status
from posttrain.annotate.storage import AnnotationDB
from posttrain.data import RecordError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def test_samples_become_every_pair_of_usable_responses():
    records = [{"prompt": "Q", "responses": ["a", "b", "c", " ", "a"], "finish_reasons": ["eos"] * 5,
                "prompt_index": 0, "sampling": {"model": "m"}},
               {"messages": CHAT, "responses": ["hi", "hello"]},
               {"prompt": "lonely", "responses": ["only", ""]},
               {"prompt": "none", "responses": []}]
    items, summary = items_from_records(records, source="s.jsonl", mode="pair")
    assert [(i.source["record"], i.source["responses"]) for i in items] == [
        (0, [0, 1]), (0, [0, 2]), (0, [1, 2]), (1, [0, 1])]
    assert items[0].prompt == [{"role": "user", "content": "Q"}]
    assert items[0].replies == ([{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}])
    assert items[3].prompt == CHAT
    assert summary.skipped_prompts == {"with fewer than 2 usable responses": 2}
    assert summary.left_out_responses == {"empty": 2, "repeated": 1}
    summary.added = 3
    assert summary.line("s.jsonl") == ("s.jsonl: read 4 records, formed 4 items (3 new, 1 already loaded); skipped 2 "
                                       "prompts (2 with fewer than 2 usable responses); left out 2 empty responses, "
                                       "1 repeated response")


def test_a_seeded_subset_of_pairs_is_the_same_on_every_load():
    every = choose_pairs(list(range(6)), 0, "x")
    assert len(every) == 15
    some = choose_pairs(list(range(6)), 4, "prompt text")
    assert len(some) == 4 and set(some) <= set(every) and some == sorted(some)
    assert choose_pairs(list(range(6)), 4, "prompt text") == some
    assert choose_pairs(list(range(6)), 99, "prompt text") == every
    records = [{"prompt": f"Q{i}", "responses": list("abcdef")} for i in range(10)]
    first, _ = items_from_records(records, source="s", mode="pair", pairs_per_prompt=2)
    again, _ = items_from_records(records, source="s", mode="pair", pairs_per_prompt=2)
    assert len(first) == 20 and [i.key for i in first] == [i.key for i in again]
    assert len({tuple(i.source["responses"]) for i in first}) > 1   # not the same two pairs for every prompt


def test_pairs_to_verify_and_single_mode_items():
    pairs = [{"prompt": "P", "chosen": "good", "rejected": "bad", "margin": 1.0},
             {"chosen": CHAT + [{"role": "assistant", "content": "hi"}],
              "rejected": CHAT + [{"role": "assistant", "content": "go away"}]}]
    items, _ = items_from_records(pairs, source="p", mode="pair")
    assert [i.replies[0][0]["content"] for i in items] == ["good", "hi"]
    assert items[1].prompt == CHAT and items[0].source == {"file": "p", "record": 0, "given": "first"}
    files = (pairs, [{"prompt": CHAT, "completion": "hey"}], [{"prompt": "Q", "responses": ["x"]}])   # one kind each
    single = [item for records in files for item in items_from_records(records, source="p", mode="single")[0]]
    assert [(i.replies[0][0]["content"], i.source.get("given")) for i in single] == [
        ("good", "chosen"), ("bad", "rejected"), ("hi", "chosen"), ("go away", "rejected"), ("hey", None), ("x", None)]
    assert single[4].prompt == CHAT


@pytest.mark.parametrize("record, mode, message", [
    ({"prompt": "Q", "completion": "c"}, "pair", "record 1: field 'responses': expected the fields of one record "
                                                 "shape .* \\(\\{prompt, completion\\} records need --mode single\\)"),
    ({"prompt": "Q", "responses": ["a", "b"], "chosen": "a"}, "pair", "field 'chosen': .* got 'responses' together"),
    ({"prompt": "Q", "responses": "ab"}, "pair", "record 1: field 'responses': expected a list of strings"),
    ({"prompt": "", "responses": ["a", "b"]}, "pair", "field 'prompt': expected a non-empty string"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "pair", "field 'rejected': expected a response different"),
    ({"text": "Q"}, "single", "expected the fields of one record shape"),
    ({"messages": "hi", "responses": ["a", "b"]}, "pair", "record 1: field 'messages': expected a list of "
                                                          "\\{role, content\\} messages, got string 'hi'"),
    ({"messages": "hi", "chosen": "a", "rejected": "b"}, "single", "field 'messages': expected a list"),
])
def test_bad_records_stop_the_load_naming_file_record_and_field(record, mode, message):
    with pytest.raises(RecordError, match=message):
        items_from_records([record], source="d.jsonl", mode=mode)


@pytest.mark.parametrize("mode", ["pair", "single"])
def test_a_file_mixing_record_kinds_is_refused_at_the_first_record_of_another_kind(mode):
    samples = {"prompt": "Q", "responses": ["a", "b"]}
    pair = {"prompt": "P", "chosen": "good", "rejected": "bad"}
    with pytest.raises(RecordError, match=r"^d.jsonl: record 3: field 'chosen': a preference \{prompt, chosen, "
                                          r"rejected\} record, but record 1 is a samples .* in a file of its own$"):
        items_from_records([samples, samples, pair], source="d.jsonl", mode=mode)
    with pytest.raises(RecordError, match="record 2: field 'responses': a samples .* but record 1 is a preference"):
        items_from_records([pair, samples], source="d.jsonl", mode=mode)
    if mode == "single":
        with pytest.raises(RecordError, match="record 2: field 'completion': a \\{prompt, completion\\} record"):
            items_from_records([pair, {"prompt": "Q", "completion": "c"}], source="d.jsonl", mode=mode)


def test_bad_options():
    with pytest.raises(ValueError, match="--mode 'both': expected one of"):
        items_from_records([], source="d", mode="both")
    with pytest.raises(ValueError, match="--pairs-per-prompt -1"):
        items_from_records([], source="d", mode="pair", pairs_per_prompt=-1)


def test_loading_is_idempotent_and_order_blind(tmp_path):
    db, _ = make_db(tmp_path, pair_records(5))
    items, _ = items_from_records(pair_records(5), source="again", mode="pair")
    assert db.add_items(items, "pair") == 0
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in pair_records(6)]
    items, _ = items_from_records(swapped, source="swapped", mode="pair")
    assert db.add_items(items, "pair") == 1 and db.item_count() == 6
    with pytest.raises(ValueError, match="holds pair-mode items; this run asked for --mode single"):
        db.add_items(items, "single")
    reopened = AnnotationDB(tmp_path / "a.sqlite")
    assert reopened.mode == "pair" and reopened.item_count() == 6
    assert reopened.read().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_databases_that_are_missing_or_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        AnnotationDB(tmp_path / "missing.sqlite")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AnnotationDB(tmp_path / "no" / "a.sqlite", create=True)
    (tmp_path / "text.sqlite").write_text("hello, this is not a database file at all" * 10)
    with pytest.raises(ValueError, match="not an SQLite database"):
        AnnotationDB(tmp_path / "text.sqlite")
    import sqlite3
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(ValueError, match=r"not a posttrain annotation database \(tables \['t'\]\)"):
        AnnotationDB(tmp_path / "other.sqlite")


def test_annotators_tokens_are_stored_only_as_hashes(tmp_path):
    db, tokens = make_db(tmp_path, pair_records(1), names=("ann",))
    assert db.annotator_for_token(tokens["ann"]).name == "ann"
    assert db.annotator_for_token(tokens["ann"] + "x") is None
    with pytest.raises(ValueError, match="already exists .* pass --new-token"):
        db.add_annotator("ann")
    with pytest.raises(ValueError, match="does not exist"):
        db.add_annotator("zed", new_token=True)
    for bad in ("", " ann", "a\nb", "x" * 65):
        with pytest.raises(ValueError, match="expected 1-64 printable characters"):
            db.add_annotator(bad)
    new = db.add_annotator("ann", new_token=True)
    assert db.annotator_for_token(tokens["ann"]) is None and db.annotator_for_token(new).name == "ann"
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.sqlite*"))
    assert new.encode() not in raw and tokens["ann"].encode() not in raw


def test_cohens_kappa_by_hand():
    # The two-rater example on Wikipedia's "Cohen's kappa" page: 50 items; yes/yes 20, yes/no 5,
    # no/yes 10, no/no 15. p_o = 35/50 = 0.7; rater 1 says yes 25/50 = 0.5, rater 2 30/50 = 0.6;
    # p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 − 0.5) / (1 − 0.5) = 0.4.
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohens_kappa(pairs) == pytest.approx(0.4)
    # Always opposite with balanced labels: p_o = 0, p_e = 0.5 → κ = −1. Always alike: κ = 1.
    assert cohens_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert cohens_kappa([("a", "a"), ("b", "b"), ("c", "c")]) == pytest.approx(1.0)
    # Three labels: p_o = 2/4; rater 1 (a a b c), rater 2 (a b b a): p_e = (2·2 + 1·2 + 1·0)/16 = 6/16;
    # κ = (8/16 − 6/16) / (10/16) = 0.2.
    assert cohens_kappa([("a", "a"), ("a", "b"), ("b", "b"), ("c", "a")]) == pytest.approx(0.2)
    assert math.isnan(cohens_kappa([("a", "a"), ("a", "a")]))   # one label throughout: p_e = 1
    with pytest.raises(ValueError, match="no labelled items"):
        cohens_kappa([])


def test_agreement_pools_label_pairs_and_weights_pairwise_kappa():
    labels = {1: {"x": "first", "y": "first", "z": "second"},
              2: {"x": "second", "y": "second"},
              3: {"x": "first", "z": "first"},
              4: {"y": "tie"}}                               # labelled once: not counted
    a = agreement(labels)
    # Label pairs: item 1 (x,y)=, (x,z)≠, (y,z)≠; item 2 (x,y)=; item 3 (x,z)= → raw 3/5.
    assert (a["items"], a["label_pairs"], a["raw"]) == (3, 5, pytest.approx(0.6))
    # (x,y) share items 1, 2: [(f,f), (s,s)] → κ = 1. (x,z) share 1, 3: [(f,s), (f,f)]: p_o = 1/2,
    # p_e = (2·1)/4 = 1/2 → κ = 0. (y,z) share item 1 only: [(f,s)]: p_e = 0 → κ = 0.
    # Weighted by shared items: (1·2 + 0·2 + 0·1) / 5 = 0.4.
    assert a["kappa"] == pytest.approx(0.4) and a["annotator_pairs"] == 3 and a["annotator_pairs_undefined"] == 0
    assert agreement({1: {"x": "first"}})["raw"] is None


def test_plurality():
    assert plurality(Counter(first=2, second=1)) == "first"
    assert plurality(Counter(first=1, second=1, tie=1)) is None
    assert plurality(Counter(tie=1)) == "tie"
    assert plurality(Counter()) is None


def label(db, annotator: str, item_id: int, choice: str, comment: str = "") -> None:
    """Store a judgement directly (its screen side fixed to first-on-the-left)."""
    with db.write() as con:
        annotator_id = con.execute("SELECT id FROM annotators WHERE name = ?", (annotator,)).fetchone()[0]
        con.execute("INSERT INTO judgements (submit_id, item_id, annotator_id, left_reply, choice, comment, created) "
                    "VALUES (?, ?, ?, 0, ?, ?, 0)", (f"{annotator}-{item_id}", item_id, annotator_id, choice, comment))


def test_export_by_majority_and_status_by_hand(tmp_path):
    records = pair_records(7)
    db, _ = make_db(tmp_path, records, names=("x", "y", "z"))
    db.set_per_item(2)
    votes = {1: ["first", "first", "second"],     # chosen = replies[0] ("good answer 0"), votes 2:1
             2: ["second", "second"],             # chosen = replies[1]
             3: ["first", "second"],              # split
             4: ["tie", "tie", "first"],          # tie wins: left out
             5: ["both_bad", "both_bad"],         # both bad wins: left out
             6: ["second"]}                       # one vote; item 7 unlabelled
    for item_id, choices in votes.items():
        for annotator, choice in zip("xyz", choices):
            label(db, annotator, item_id, choice, comment="close call" if item_id == 1 and annotator == "z" else "")
    out, summary = export_records(db)
    assert [(r["chosen"], r["rejected"]) for r in out] == [("good answer 0", "bad answer 0"),
                                                           ("bad answer 1", "good answer 1"),
                                                           ("bad answer 5", "good answer 5")]
    assert out[0]["prompt"] == "question 0"
    assert out[0]["annotation"] == {"item": 1, "votes": {"chosen": 2, "rejected": 1, "tie": 0, "both_bad": 0},
                                    "comments": ["close call"], "source": {"file": "data.jsonl", "record": 0,
                                                                           "given": "first"}}
    assert summary.left_out == {"split votes": 1, "ties by majority": 1, "both bad by majority": 1, "unlabelled": 1}
    out2, summary2 = export_records(db, min_votes=2)
    assert len(out2) == 2 and summary2.left_out["with fewer than 2 votes"] == 1
    with pytest.raises(ValueError, match="--min-votes 0"):
        export_records(db, min_votes=0)

    s = status(db)
    assert (s["items"], s["complete"], s["started"], s["unlabelled"], s["labels"]) == (7, 5, 1, 1, 13)
    assert s["annotators"] == {"x": 6, "y": 5, "z": 2}
    assert s["choices"] == {"first": 4, "second": 5, "tie": 2, "both_bad": 2}
    assert s["tie_share"] == pytest.approx(2 / 13) and s["both_bad_share"] == pytest.approx(2 / 13)
    # Majorities that pick a reply: items 1 (the file's chosen), 2 and 6 (its rejected).
    assert s["verified"] == {"pairs": 7, "decided": 3, "agree": 1}


def test_single_mode_export(tmp_path):
    db, _ = make_db(tmp_path, [{"prompt": "Q", "responses": ["r0", "r1", "r2"]}], mode="single", names=("x", "y"))
    for item_id, choices in {1: ["good", "good"], 2: ["bad"], 3: ["good", "bad"]}.items():
        for annotator, choice in zip("xy", choices):
            label(db, annotator, item_id, choice)
    out, summary = export_records(db)
    assert out == [
        {"prompt": "Q", "completion": "r0", "label": True, "annotation": {
            "item": 1, "votes": {"good": 2, "bad": 0}, "comments": [],
            "source": {"file": "data.jsonl", "record": 0, "responses": [0]}}},
        {"prompt": "Q", "completion": "r1", "label": False, "annotation": {
            "item": 2, "votes": {"good": 0, "bad": 1}, "comments": [],
            "source": {"file": "data.jsonl", "record": 0, "responses": [1]}}}]
    assert summary.left_out == {"split votes": 1}
    assert status(db)["agreement"]["raw"] == pytest.approx(0.5)
