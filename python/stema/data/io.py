"""Read data files into records: plain dicts, each with the place it came from; write JSON Lines
atomically (`write_jsonl_atomic`).

Supported inputs, chosen by the path:

| input | location of a record |
| --- | --- |
| `*.jsonl` (JSON Lines; blank lines skipped) | `file.jsonl:LINE` (1-based physical line) |
| `*.json`: an array of objects, or an object holding exactly one such array | `file.json:item N` (0-based index) |
| `*.parquet` | `file.parquet:row N` (0-based, as `table[N]`) |
| a `datasets.save_to_disk` folder (a Dataset, or a DatasetDict with one split) | `folder:row N` (0-based, as `ds[N]`) |

A `.json` file that holds JSON Lines (as Hugging Face `datasets` also accepts) is read as JSON Lines.
Lines count from 1 because editors do; rows and items count from 0 because that is how one indexes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from stema.data.errors import DataError


@dataclass(frozen=True)
class Record:
    """One input record: its fields as read, and where it came from (`file.jsonl:12`)."""

    fields: dict[str, Any]
    location: str


def read_records(path: str | Path) -> list[Record]:
    """All records of a JSONL / JSON / Parquet file or a `save_to_disk` folder; DataError if none or unreadable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path, _read_text(path))
    elif path.suffix == ".json":
        records = _read_json(path)
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unknown data file extension {path.suffix!r} "
            "(expected .jsonl, .json, .parquet or a datasets.save_to_disk folder)"
        )
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{location}: invalid JSON: {error.msg} (column {error.colno})") from None
        except RecursionError:
            raise DataError(f"{location}: invalid JSON: nested too deeply") from None
        records.append(Record(_as_object(value, location), location))
    return records


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are a DataError naming the line and byte offset."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8: byte 0x{data[error.start]:02x} at byte offset {error.start} (column {column}); "
            "save the file as UTF-8"
        ) from None


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON Lines in a .json file
        raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: a JSON object must hold exactly one list of records; "
                f"found {len(lists)} list fields ({', '.join(lists) or 'none'})"
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    return [Record(_as_object(item, f"{path}:item {index}"), f"{path}:item {index}") for index, item in enumerate(value)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read Parquet: {error}") from None
    return [Record(row, f"{path}:row {index}") for index, row in enumerate(rows)]


def _read_saved_dataset(path: Path) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a folder that is not a datasets.save_to_disk folder") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) != 1:
            raise DataError(
                f"{path}: a DatasetDict with splits {', '.join(splits)}; "
                f"give one split's folder (e.g. {path / splits[0]})"
            )
        dataset = dataset[splits[0]]
    return [Record(row, f"{path}:row {index}") for index, row in enumerate(dataset)]


def _as_object(value: Any, location: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{location}: expected a JSON object (a record with named fields), got {type(value).__name__}")
    return value


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as JSON Lines to `path` through a temporary file renamed into place, so a
    crash never leaves a half-written file where a finished one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
