"""Where records come from: text files, JSONL, Parquet, saved `datasets` folders.

Each reader yields `(record, where)` pairs; `where` is `file:line` (or `file:row`) so any
later error can point at the exact place in the user's data.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from ..config import expand_path
from ..errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".html", ".css", ".sh"}
JSONL_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in DATASET_MARKERS)


def resolve(patterns: list[str], max_files: int = 0) -> list[Path]:
    """Files (or `datasets` folders) named by paths, folders and globs, in a stable order."""
    found: list[Path] = []
    for raw in patterns:
        pattern = expand_path(raw)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"data path {raw!r}: the pattern matches no files")
            found.extend(p for p in matches if p.is_file())
            continue
        path = Path(pattern)
        if not path.exists():
            raise DataError(f"data path {raw!r}: no such file or folder")
        if path.is_file() or is_datasets_folder(path):
            found.append(path)
            continue
        readable = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in readable)
        if not files:
            raise DataError(f"data folder {raw!r} has no readable files ({', '.join(sorted(readable))})")
        found.extend(files)
    if max_files and len(found) > max_files:
        found = found[:max_files]
    return found


def read_records(path: Path, text_field: str = "text") -> Iterator[tuple[dict, str]]:
    """Yield `(record, where)` for every example in one file or `datasets` folder."""
    if is_datasets_folder(path):
        yield from _read_datasets_folder(path)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        yield from _read_jsonl(path)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _read_parquet(path)
    else:
        yield from _read_text(path, text_field)


def _read_text(path: Path, text_field: str) -> Iterator[tuple[dict, str]]:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: looks like a binary file, not text; remove it from data.train or point at text/JSONL/Parquet files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text; re-encode the file as UTF-8") from None
    if text.strip():
        yield {text_field: text}, str(path)


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8; re-encode the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            yield record, where


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file; all mean the same to the user
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield record, f"{path}:row {row}"
            row += 1


def _read_datasets_folder(path: Path) -> Iterator[tuple[dict, str]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has: {', '.join(loaded)}); point at one split's folder")
        loaded = loaded["train"]
    for row, record in enumerate(loaded):
        yield record, f"{path}:row {row}"
