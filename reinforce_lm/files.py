"""Reading rows from JSONL, JSON, CSV, Parquet or a saved `datasets` directory, remembering where each
row came from (`Rows.locate(i)` -> "prompts.jsonl:17": 1-based line for JSONL/CSV, 0-based row index,
said as such, for JSON/Parquet/`datasets`), so every later error can name the file and line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import DataError


class Rows(list):
    """A list of row dicts with a parallel list of location strings, `sources[i]` for `self[i]`."""

    def __init__(self, rows=(), sources=()):
        super().__init__(rows)
        self.sources = list(sources)

    def locate(self, i: int) -> str:
        """Where row `i` came from, e.g. "prompts.jsonl:17" or "data.parquet: row index 3"."""
        return self.sources[i]


def read_rows(path) -> Rows:
    """Read every row of a .jsonl/.json/.csv/.parquet file or a saved `datasets` directory."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file or directory")
    if path.is_dir():
        rows, sources = _read_dataset_dir(path)
    else:
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
            raise DataError(
                f"{name}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet "
                "or a directory written by datasets' save_to_disk"
            )
        if path.stat().st_size == 0:
            raise DataError(f"{name}: the file is empty")
        reader = {".csv": _read_csv, ".parquet": _read_parquet, ".json": _read_json}.get(suffix, _read_jsonl)
        rows, sources = reader(path)
    if not rows:
        raise DataError(f"{name}: no rows found")
    return Rows(rows, sources)


def _read_jsonl(path: Path):
    rows, sources = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            sources.append(f"{path}:{lineno}")
    return rows, sources


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}){hint}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row index {i}: expected a JSON object, got {type(row).__name__}")
    return data, [f"{path}: row index {i}" for i in range(len(data))]


def _read_csv(path: Path):
    rows, sources = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # line_num is the line where this record ends (records may span lines inside quotes).
            if None in row:
                raise DataError(
                    f"{path}:{reader.line_num}: more fields than the header's "
                    f"{len(reader.fieldnames)} columns {reader.fieldnames}"
                )
            rows.append(row)
            sources.append(f"{path}:{reader.line_num}")
    return rows, sources


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install reinforce-lm[data]") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file: {err}") from None
    return rows, [f"{path}: row index {i}" for i in range(len(rows))]


def _read_dataset_dir(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a datasets directory needs: pip install reinforce-lm[data]"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    rows = ds.to_list()
    return rows, [f"{path}: row index {i}" for i in range(len(rows))]


def write_jsonl(path, rows: list[dict]) -> Path:
    """Write `rows` as JSON Lines (the format `read_rows` reads first), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
