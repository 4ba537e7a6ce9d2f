"""Read a data source into a list of plain dict records, whatever the file format.

Sources, picked by what `source` is:

Text files are read as UTF-8; a leading byte-order mark (as Excel writes) is ignored.

* `*.jsonl` — one JSON object per line; blank lines are skipped (record numbers count records,
  so they equal line numbers only in a file without blank lines). A line that is no JSON object
  is an error, or, with `bad_lines=True`, a `BadLine` in its place (the loaders' skip_invalid).
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

import codecs
import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError, short_repr, type_name

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
NUMERIC_CSV_COLUMNS = ("margin",)
BOOLEAN_CSV_COLUMNS = ("label",)
# Names that can only be files: a hub dataset id does not end in a file suffix.
LOCAL_FILE_SUFFIX = re.compile(r"\.(txt|tsv|jsonl?|csv|parquet|xlsx?|ya?ml|gz|zip|arrow)$", re.IGNORECASE)
# A split name, optionally sliced the way `datasets` slices (train, test[:100], train[10%:]).
_SPLIT_SUFFIX = re.compile(r"^(?P<name>.+):(?P<split>[A-Za-z_][\w.-]*(\[[^\]]*\])?)$")


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that holds no record, kept in its place by read_records(bad_lines=True) so
    that the records after it keep their numbers."""

    error: DataError
    """What read_records raises for the line otherwise (it names the file and the line)."""
    reason: str
    """The cause in a few words, as a LoadReport counts invalid records ("invalid JSON")."""


def read_records(source: str | os.PathLike, *, bad_lines: bool = False) -> list[dict[str, Any]]:
    """Every record of `source` (see the module docstring for formats), in file order.

    Raises DataError naming `source` if it is missing or unreadable, is not a list of JSON
    objects, or holds no records. With bad_lines, a JSONL line that is not UTF-8, not JSON or
    not an object is returned as a BadLine instead of raising (a whole-file format has no lines
    to skip, so it still raises).
    """
    name = str(source)
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{name}: {'not a file' if path.exists() else 'no such file'}")
        if path.suffix.lower() == ".jsonl":
            records = _read_jsonl(path, name, bad_lines)
        else:
            records = _READERS[path.suffix.lower()](path, name)
    elif path.is_dir() and _is_saved_dataset(path):
        records = _read_saved_dataset(path, name)
    else:
        records = _read_with_datasets(name)
    if not records:
        raise DataError(f"{name}: no records")
    return records


def _read_jsonl(path: Path, name: str, bad_lines: bool = False) -> list[dict[str, Any] | BadLine]:
    records: list[dict[str, Any] | BadLine] = []
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                records.extend(_jsonl_record(raw, name, line_number))
            except _LineError as bad:
                if not bad_lines:
                    raise bad.error from None
                records.append(BadLine(bad.error, bad.reason))
    return records


class _LineError(Exception):
    def __init__(self, message: str, reason: str):
        self.error, self.reason = DataError(message), reason


def _jsonl_record(raw: bytes, name: str, line_number: int) -> list[dict[str, Any]]:
    """The record of one JSONL line ([] for a blank line); _LineError for a line that has none."""
    try:
        line = _decode(raw[3:] if line_number == 1 and raw.startswith(codecs.BOM_UTF8) else raw, name, line_number)
    except DataError as e:
        raise _LineError(str(e), "not UTF-8") from None
    if not line.strip():
        return []
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"{name}: not valid JSON lines (line {line_number}: {e.msg} at column {e.colno})",
                         "invalid JSON") from None
    except RecursionError:
        raise _LineError(f"{name}: line {line_number}: JSON nested too deeply to read", "JSON nested too deeply") \
            from None
    if not isinstance(value, dict):
        raise _LineError(f"{name}: not valid JSON lines (line {line_number}: expected a JSON object, "
                         f"got {type_name(value)} {short_repr(value)})", "not a JSON object")
    return [value]


def _decode(raw: bytes, name: str, line_number: int) -> str:
    """UTF-8 text of line `line_number` (1-based) of the file `name`; DataError naming the line
    and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
        raise DataError(f"{name}: line {line_number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                        f"{column}); save the file as UTF-8") from None


def _read_json(path: Path, name: str) -> list[dict[str, Any]]:
    data = path.read_bytes()
    data = data[3:] if data.startswith(codecs.BOM_UTF8) else data
    for line_number, raw in enumerate(data.splitlines(), start=1):
        _decode(raw, name, line_number)
    try:
        value = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: not valid JSON (line {e.lineno}: {e.msg} at column {e.colno})") from e
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply to read") from None
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
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        _decode(raw[3:] if line_number == 1 and raw.startswith(codecs.BOM_UTF8) else raw, name, line_number)
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

    from posttrain.models.load import hub_unreachable, looks_local

    match = _SPLIT_SUFFIX.match(name)
    dataset_name, split = (match["name"], match["split"]) if match else (name, "train")
    # Fail at once where datasets would ask the hub (and retry for ~25 s) for what is plainly a
    # local file: an existing file of another format, a missing path, or "data.txt".
    path = Path(dataset_name).expanduser()
    if path.is_file():
        raise DataError(f"{name}: unsupported file type {path.suffix or '(no suffix)'!r}; expected "
                        f"{', '.join(FILE_SUFFIXES)}, a saved dataset folder or a hub dataset id")
    if not path.exists() and (looks_local(dataset_name) or LOCAL_FILE_SUFFIX.search(dataset_name)):
        raise DataError(f"{name}: no such file or folder")
    reason = None if path.exists() else hub_unreachable()
    if reason and "offline" not in reason:  # offline, datasets reads its own cache quickly
        raise DataError(f"{name}: no such file or folder, and the hub cannot be asked for a dataset of that "
                        f"name ({reason})")
    try:
        loaded = datasets.load_dataset(dataset_name, split=split)
    except Exception as e:  # datasets raises many unrelated types; all mean "cannot load this"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if path.is_dir():  # what a folder must hold, which datasets' message does not say
            raise DataError(f"{name}: a folder, but neither a saved dataset (save_to_disk) nor data files "
                            f"datasets.load_dataset can read ({message})") from e
        raise DataError(f"{name}: cannot load with datasets.load_dataset ({message})") from e
    return loaded.to_list()
