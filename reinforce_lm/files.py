"""Reading rows from JSONL, JSON, CSV, Parquet or a saved `datasets` directory, remembering where each
row came from (`Rows.locate(i)` -> "prompts.jsonl:17": 1-based line for JSONL/CSV, 0-based row index,
said as such, for JSON/Parquet/`datasets`), so every later error can name the file and line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
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


def _read_text(path: Path) -> str:
    """The file's text as UTF-8. `utf-8-sig` also drops a leading byte-order mark (Excel's CSVs, some
    editors' JSONL), which would otherwise stick to the first key. Other encodings are a DataError at the
    first bad byte: found in the raw bytes, as text-mode reading only knows the chunk it decodes."""
    data = path.read_bytes()
    data = data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data  # positions below
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[start : err.start].decode("utf-8", "replace")) + 1  # in characters, like JSON's
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None


def _loads(text: str, where: str):
    """`json.loads`, with the errors other than JSONDecodeError (which the callers place) as DataErrors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError:  # int() refuses more digits than this (CVE-2020-10735)
        raise DataError(
            f"{where}: invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)"
        ) from None


def _no_lone_surrogates(raw: str, row: dict, where: str) -> None:
    """A `\\ud800`-style escape may decode to half of a UTF-16 surrogate pair, which is no character:
    tokenizers fail on such text with a TypeError. Only rows whose raw text has such an escape are
    checked."""
    if "\\ud" not in raw and "\\uD" not in raw:
        return
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        half = ord(err.object[err.start])
        raise DataError(
            f"{where}: invalid JSON (the escape \\u{half:04x} is half of a UTF-16 surrogate pair, "
            "not a character)"
        ) from None


def _read_jsonl(path: Path):
    rows, sources = [], []
    # Split on "\n" only: str.splitlines would also split on characters that JSON strings may hold raw.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")  # without the line end, a truncated line's error column is on this line
        if not line.strip():
            continue
        try:
            row = _loads(line, f"{path}:{lineno}")
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        _no_lone_surrogates(line, row, f"{path}:{lineno}")
        rows.append(row)
        sources.append(f"{path}:{lineno}")
    return rows, sources


def _read_json(path: Path):
    text = _read_text(path)
    try:
        data = _loads(text, str(path))
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg.removesuffix(' at')} at column {err.colno}){hint}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row index {i}: expected a JSON object, got {type(row).__name__}")
        _no_lone_surrogates(text, row, f"{path}: row index {i}")
    return data, [f"{path}: row index {i}" for i in range(len(data))]


def _read_csv(path: Path):
    rows, sources = [], []
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = reader.fieldnames or []
    if twice := sorted({name for name in header if header.count(name) > 1}):
        # DictReader would keep each row's last value under the name and drop the others unseen.
        raise DataError(f"{path}:1: the header names the column {twice[0]!r} more than once {header}")
    for row in reader:
        # line_num is the line where this record ends (records may span lines inside quotes).
        if None in row:
            raise DataError(
                f"{path}:{reader.line_num}: more fields than the header's "
                f"{len(reader.fieldnames)} columns {reader.fieldnames}"
            )
        # DictReader fills a short row's missing fields with None (an empty field is ""): a cut-off
        # row, not a value, which a reward function would otherwise receive as None.
        if missing := [k for k, v in row.items() if v is None]:
            raise DataError(
                f"{path}:{reader.line_num}: fewer fields than the header's {len(reader.fieldnames)} "
                f"columns {reader.fieldnames}; no value for {missing}"
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
        if empty := _empty_dataset(path):
            raise DataError(f"{empty}: the dataset is empty (0 rows)") from None
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    rows = ds.to_list()
    return rows, [f"{path}: row index {i}" for i in range(len(rows))]


def _empty_dataset(path: Path) -> Path | None:
    """The directory (`path` or one split of it) of a dataset saved with no rows: `datasets` writes it
    without data files and then fails to load it (an IndexError)."""
    for state in [path / "state.json", *sorted(path.glob("*/state.json"))]:
        try:
            if json.loads(state.read_text(encoding="utf-8")).get("_data_files") == []:
                return state.parent
        except (OSError, ValueError, AttributeError):  # not the state file of a saved dataset
            continue
    return None


def write_jsonl(path, rows: list[dict]) -> Path:
    """Write `rows` as JSON Lines (the format `read_rows` reads first), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
