"""read_records: every format gives the same plain dicts; every file-level problem names the file."""

from __future__ import annotations

import json

import pytest

from posttrain.data import DataError, read_records

ROWS = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_records(path) == ROWS


@pytest.mark.parametrize("content", [ROWS, {"data": ROWS}])
def test_json_list_or_object_with_one_list_field(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(content))
    assert read_records(path) == ROWS


def test_csv_cells_are_text_except_margin(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeffprompt,chosen,rejected,margin\nQ?,42,41,1.5\nQ2?,yes,no,\n")  # Excel's BOM
    assert read_records(path) == [
        {"prompt": "Q?", "chosen": "42", "rejected": "41", "margin": 1.5},  # "42" stays a string
        {"prompt": "Q2?", "chosen": "yes", "rejected": "no", "margin": None},
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_records(path) == ROWS


def test_saved_dataset_folder_and_data_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "saved") == ROWS
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "test.jsonl", ROWS[:1])
    assert read_records(folder) == ROWS
    assert read_records(f"{folder}:test") == ROWS[:1]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "bad.jsonl: not valid JSON lines (line 2: "),
        ("list.jsonl", '{"prompt": "a"}\n[1, 2]\n',
         "list.jsonl: not valid JSON lines (line 2: expected a JSON object, got list [1, 2])"),
        ("bad.json", '[{"prompt": "a"},', "bad.json: not valid JSON (line 1: "),
        ("obj.json", '{"a": [], "b": []}',
         "obj.json: expected a JSON list of records (or an object with one list field), got object with fields"),
        ("items.json", '[{"prompt": "a"}, "b"]', "items.json: record 2: expected a JSON object, got string 'b'"),
        ("empty.jsonl", "\n\n", "empty.jsonl: no records"),
        ("empty.json", "[]", "empty.json: no records"),
        ("cells.csv", "prompt,completion\na,b,c\n", "cells.csv: record 1: more cells than the 2 header columns"),
        ("margin.csv", "prompt,chosen,rejected,margin\na,b,c,big\n",
         "margin.csv: record 1: field 'margin': expected a number, got 'big'"),
        ("bad.parquet", "not parquet", "bad.parquet: not a readable Parquet file"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file$"):
        read_records(tmp_path / "nope.jsonl")


def test_unloadable_dataset_names_the_source(tmp_path):
    folder = tmp_path / "no_data_files"
    folder.mkdir()
    with pytest.raises(DataError, match=rf"^{folder}:test: a folder, but neither a saved dataset .* nor data files"):
        read_records(f"{folder}:test")
