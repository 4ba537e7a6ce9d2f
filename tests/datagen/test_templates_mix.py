"""`posttrain data mix`: shares by weight with a cap per source (worked out by hand below),
examples-proportional mixing, repeats of a small source, the seed, provenance and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.datagen.mix import draw, mix_records, mixture_counts, parse_source, whole_shares

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_whole_shares_sum_to_n_by_largest_remainder():
    # 10 · (1, 1, 1)/3 = 3.33 each: the first source takes the one left over.
    assert whole_shares(10, [1, 1, 1]) == [4, 3, 3]
    # 7 · (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4 → 3, 2, 1 and the largest remainder (0.5) gets the 7th.
    assert whole_shares(7, [0.5, 0.3, 0.2]) == [4, 2, 1]


def test_a_capped_source_hands_its_surplus_to_the_others():
    # 100 · (.5, .3, .2) = 50, 30, 20; cap 40 → 40, and 60 left over (.3, .2) → 36, 24.
    assert mixture_counts(100, [0.5, 0.3, 0.2], cap=40) == [40, 36, 24]
    # 100 · (.6, .3, .1) = 60 > 35 → 35; 65 · (.3, .1)/.4 = 48.75, 16.25 → 49 > 35 → 35; 30 to the last.
    assert mixture_counts(100, [0.6, 0.3, 0.1], cap=35) == [35, 35, 30]
    assert mixture_counts(100, [0.6, 0.3, 0.1]) == [60, 30, 10]
    with pytest.raises(ValueError, match="--n 106 is more than 3 sources capped at 35 can give"):
        mixture_counts(106, [1, 1, 1], cap=35)
    with pytest.raises(ValueError, match="--n 0: expected at least 1 record"):
        mixture_counts(0, [1.0])


def test_examples_proportional_mixing_caps_the_size_of_a_big_source():
    sources = [(name, [{"i": i} for i in range(size)]) for name, size in (("big", 1000), ("mid", 100), ("small", 10))]
    # Sizes capped at 200: rates ∝ 200, 100, 10 → 155 · (200, 100, 10)/310 = 100, 50, 5.
    _, counts = mix_records(sources, 155, cap=200)
    assert counts == [100, 50, 5]
    # Without a cap the big source takes 1000/1110 of the mixture.
    _, counts = mix_records(sources, 111)
    assert counts == [100, 10, 1]


def test_a_small_source_is_repeated_in_whole_passes():
    import random

    picks = draw(10, 25, random.Random(0))
    # Two full passes and 5 more without repeats: every record 2 or 3 times, five of them 3 times.
    times = Counter(picks)
    assert set(times) == set(range(10)) and sorted(times.values()) == [2] * 5 + [3] * 5


def test_parse_source_reads_a_weight_only_when_the_suffix_is_a_number():
    assert parse_source("a.jsonl:0.5").weight == 0.5
    assert parse_source("org/name:test") == parse_source("org/name:test")
    assert parse_source("org/name:test").weight is None and parse_source("org/name:test").path == "org/name:test"
    with pytest.raises(ValueError, match="weight '-1': expected a finite number > 0"):
        parse_source("a.jsonl:-1")


def test_the_mix_command_writes_the_shares_with_provenance_and_the_seed_decides(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(8)])
    outputs = []
    for seed in ("0", "0", "1"):
        out = tmp_path / f"mix{len(outputs)}.jsonl"
        assert main(["data", "mix", f"{a}:0.5", f"{b}:0.5", "--n", "30", "--cap-per-source", "20", "--seed", seed,
                     "--output", str(out)]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    rows = read_jsonl(tmp_path / "mix0.jsonl")
    by_source = Counter(r["mix"]["source"] for r in rows)
    assert by_source == {str(a): 15, str(b): 15}
    # b has 8 records for 15 places: one full pass and 7 more.
    assert sorted(Counter(r["prompt"] for r in rows if r["mix"]["source"] == str(b)).values()) == [1] + [2] * 7
    for r in rows:
        assert r["prompt"] == f"{'a' if r['mix']['source'] == str(a) else 'b'}{r['mix']['index']}"
    # Shuffled: the two sources interleave.
    assert [r["mix"]["source"] for r in rows[:15]] != [str(a)] * 15
    out = capsys.readouterr().out
    assert f"{b}: 15 of 8 records (50.0% of the mixture, 1.88 passes)" in out


@pytest.mark.parametrize("args, message", [
    (["A:0.5", "B:0.5", "--n", "0"], "--n 0: expected at least 1 record"),
    (["A:0.5", "B", "--n", "5"], "give every source a weight (PATH:W) or none"),
    (["A", "A", "--n", "5"], "source given twice"),
    (["A", "E", "--n", "5"], "empty.jsonl: no records"),
    (["A", "B", "--n", "50", "--cap-per-source", "20"], "--n 50 is more than 2 sources capped at 20 can give"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    files = {"A": write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 3),
             "B": write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "d"}] * 3),
             "E": write_jsonl(tmp_path / "empty.jsonl", [])}
    argv = []
    for arg in args:
        name, _, weight = arg.partition(":")
        argv.append(f"{files[name]}{':' + weight if weight else ''}" if name in files else arg)
    out = tmp_path / "mix.jsonl"
    assert main(["data", "mix", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".mix.jsonl*"))


# --- fresh-user findings --------------------------------------------------------------------

def run_mix(tmp_path, capsys, *args: str) -> tuple[int, str]:
    out = tmp_path / "mix.jsonl"
    code = main(["data", "mix", *args, "--output", str(out)])
    return code, capsys.readouterr().err.strip()


def test_a_weight_that_is_no_number_is_named(tmp_path, capsys, monkeypatch):
    """`data mix A.jsonl:abc B.jsonl` said "unsupported file type '.jsonl'; expected .jsonl, …"."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "A.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    write_jsonl(tmp_path / "B.jsonl", [{"prompt": "q", "completion": "d"}] * 3)
    code, err = run_mix(tmp_path, capsys, "A.jsonl:abc", "B.jsonl", "--n", "4")
    assert code == 2 and err.endswith("A.jsonl:abc: weight 'abc' is not a number") and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        parse_source("missing.parquet:x")
    # A hub id with a split is still a source without a weight, and so is a file whose name has a colon.
    (tmp_path / "c:d.jsonl").write_text("")
    assert parse_source("org/name:train[:10]").weight is None and parse_source("c:d.jsonl").path == "c:d.jsonl"
    assert not (tmp_path / "mix.jsonl").exists()


def test_the_same_file_by_another_path_is_given_twice(tmp_path, capsys, monkeypatch):
    """`data mix A.jsonl ./A.jsonl` was accepted."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "A.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    code, err = run_mix(tmp_path, capsys, "A.jsonl", "./A.jsonl", "--n", "4")
    assert code == 2 and err.endswith("source given twice: ./A.jsonl (= A.jsonl)")
    assert not (tmp_path / "mix.jsonl").exists()


def test_records_posttrain_sft_cannot_read_are_refused_unless_any_shape(tmp_path, capsys):
    """Mixing {text, label} with {prompt, completion} exited 0 and failed later in sft."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine", "label": "positive"}] * 2)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    code, err = run_mix(tmp_path, capsys, str(b), str(a), "--n", "4")
    assert code == 2 and len(err.splitlines()) == 1 and f"{a}: record 1: " in err, err
    assert not (tmp_path / "mix.jsonl").exists()
    # Every sft shape mixes; --any-shape mixes anything.
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "u"},
                                                         {"role": "assistant", "content": "a"}]},
                                           {"instruction": "i", "input": "", "output": "o"}])
    assert run_mix(tmp_path, capsys, str(b), str(c), "--n", "4")[0] == 0
    assert run_mix(tmp_path, capsys, str(b), str(a), "--n", "4", "--any-shape")[0] == 0
    assert len(read_jsonl(tmp_path / "mix.jsonl")) == 4


def test_n_far_beyond_the_sources_is_refused_up_front(tmp_path, capsys):
    """`data mix … --n 100000000` was OOM-killed."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "d"}] * 3)
    code, err = run_mix(tmp_path, capsys, str(a), str(b), "--n", "100000000")
    assert code == 2 and err.endswith("--n 100000000: expected 1 to 10000000 records")
    code, err = run_mix(tmp_path, capsys, str(a), str(b), "--n", "601")
    assert code == 2 and err.endswith("--n 601 is more than 100 × the 6 records of the sources (600)")
    assert not (tmp_path / "mix.jsonl").exists()
    assert run_mix(tmp_path, capsys, str(a), str(b), "--n", "600")[0] == 0


def test_the_closing_lines_count_in_the_singular_and_output_is_replaced(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    out = tmp_path / "mix.jsonl"
    out.write_text("old\n")
    assert main(["data", "mix", str(a), "--n", "1", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote 1 record to {out}"
    assert lines[1].startswith(f"  {a}: 1 of 1 record (100.0% of the mixture")
    assert read_jsonl(out) == [{"prompt": "p", "completion": "c", "mix": {"source": str(a), "index": 0}}]
