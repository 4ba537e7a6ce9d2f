"""Read a data source into a list of plain dict records, whatever the file format.

Sources, picked by what `source` is:

Text files are read as UTF-8; a leading byte-order mark (as Excel writes) is ignored.

* `*.jsonl` — one JSON object per line; blank lines are skipped (record numbers count records,
  so they equal line numbers only in a file without blank lines).
* `*.json` — a list of objects, or an object with exactly one field, whose value is that list
  (`{"data": [...]}`, as some exporters write it). Anything else is an error, not a guess.
* `*.csv` — a header row then one record per row. Every cell is text, as CSV has no types,
  except the `margin` column, parsed as a number (an empty cell means no margin), and the
  `label` column, `true` or `false` in any case. Only the flat record shapes fit in CSV (no
  message lists).
* `*.parquet` — one record per row.
* an existing folder written by `datasets.Dataset.save_to_disk` — loaded with `load_from_disk`.
* anything else (another folder of data files, a hub id) — `datasets.load_dataset(source)`,
  split "train". Append `:split` to choose another split, e.g. `org/name:test` or
  `org/name:train[:1000]`.

Null values are kept as None; the record validators treat a null field as absent, because
Parquet and `datasets` fill a column that some rows lack with nulls.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError, short_repr, type_name

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
NUMERIC_CSV_COLUMNS = ("margin",)
BOOLEAN_CSV_COLUMNS = ("label",)
# A split name, optionally sliced the way `datasets` slices (train, test[:100], train[10%:]).
_SPLIT_SUFFIX = re.compile(r"^(?P<name>.+):(?P<split>[A-Za-z_][\w.-]*(\[[^\]]*\])?)$")


def read_records(source: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of `source` (see the module docstring for formats), in file order.

    Raises DataError naming `source` if it is missing or unreadable, is not a list of JSON
    objects, or holds no records.
    """
    name = str(source)
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{name}: no such file")
        records = _READERS[path.suffix.lower()](path, name)
    elif path.is_dir() and _is_saved_dataset(path):
        records = _read_saved_dataset(path, name)
    else:
        records = _read_with_datasets(name)
    if not records:
        raise DataError(f"{name}: no records")
    return records


def _read_jsonl(path: Path, name: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{name}: not valid JSON lines (line {line_number}: {e.msg} at column {e.colno})"
                ) from e
            if not isinstance(value, dict):
                raise DataError(
                    f"{name}: not valid JSON lines (line {line_number}: expected a JSON object, "
                    f"got {type_name(value)} {short_repr(value)})"
                )
            records.append(value)
    return records


def _read_json(path: Path, name: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: not valid JSON (line {e.lineno}: {e.msg} at column {e.colno})") from e
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        what = f"object with fields {sorted(value)[:5]}" if isinstance(value, dict) else type_name(value)
        raise DataError(f"{name}: expected a JSON list of records (or an object with one list field), got {what}")
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{name}: record {i}: expected a JSON object, got {type_name(item)} {short_repr(item)}")
    return value


def _read_csv(path: Path, name: str) -> list[dict[str, Any]]:
    records = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, strict=True)
            for i, row in enumerate(reader, start=1):
                if None in row:  # DictReader files surplus cells under the key None
                    raise DataError(f"{name}: record {i}: more cells than the {len(reader.fieldnames)} header columns")
                records.append({key: _csv_cell(key, value, name, i) for key, value in row.items()})
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{name}: not a readable CSV file ({e})") from e
    return records


def _csv_cell(column: str, value: str | None, name: str, record: int) -> Any:
    if column not in NUMERIC_CSV_COLUMNS + BOOLEAN_CSV_COLUMNS:
        return value
    if value is None or value.strip() == "":
        return None
    if column in BOOLEAN_CSV_COLUMNS:
        if value.strip().lower() not in ("true", "false"):
            raise DataError(f"{name}: record {record}: field '{column}': expected true or false, got {short_repr(value)}")
        return value.strip().lower() == "true"
    try:
        number = float(value)
    except ValueError:
        raise DataError(
            f"{name}: record {record}: field '{column}': expected a number, got {short_repr(value)}"
        ) from None
    if not math.isfinite(number):
        raise DataError(f"{name}: record {record}: field '{column}': expected a finite number, got {short_repr(value)}")
    return number


def _read_parquet(path: Path, name: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e})") from e


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved_dataset(path: Path, name: str) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{name}: saved DatasetDict has no 'train' split (splits: {sorted(loaded)})")
        loaded = loaded["train"]
    return loaded.to_list()


def _read_with_datasets(name: str) -> list[dict[str, Any]]:
    import datasets

    match = _SPLIT_SUFFIX.match(name)
    dataset_name, split = (match["name"], match["split"]) if match else (name, "train")
    try:
        loaded = datasets.load_dataset(dataset_name, split=split)
    except Exception as e:  # datasets raises many unrelated types; all mean "cannot load this"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name}: cannot load with datasets.load_dataset ({message})") from e
    return loaded.to_list()
