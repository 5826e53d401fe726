"""Where records come from: text files, JSONL, Parquet, saved `datasets` folders.

Each reader yields `(record, where)` pairs; `where` is `file:line` (or `file:row`) so any
later error can point at the exact place in the user's data.

A bad record raises DataError, unless the caller passes a `Skipped` (data.on_error: skip):
then it is counted there and reading goes on. The unit skipped is the smallest one that
is broken: a JSONL line, or a whole text file (one record) that is binary or not UTF-8.
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
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KB of a text file: binary, not text
# One JSONL record at most this long. Far above any training example, it keeps a file without
# newlines from being read into memory whole, and one giant string from tokenising for minutes.
MAX_LINE_BYTES = 16 * 2**20


class Skipped:
    """Records left out under data.on_error: skip: how many, and where the first few were."""

    SHOWN = 5  # enough to find the pattern; the rest are counted

    def __init__(self) -> None:
        self.count = 0
        self.reasons: list[str] = []

    def add(self, error: DataError) -> None:
        self.count += 1
        if len(self.reasons) < self.SHOWN:
            self.reasons.append(str(error))

    def absorb(self, other: "Skipped") -> None:
        """Count `other`'s records after this one's, and empty it."""
        self.count += other.count
        self.reasons.extend(other.reasons[: self.SHOWN - len(self.reasons)])
        other.count, other.reasons = 0, []


def bad(error: DataError, skipped: Skipped | None) -> None:
    """Raise `error`, or count it when bad records are being skipped."""
    if skipped is None:
        raise error
    skipped.add(error)


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in DATASET_MARKERS)


def resolve(patterns: list[str], max_files: int = 0, key: str = "data.train", all_files: bool = False, log=None) -> list[Path]:
    """Files (or `datasets` folders) named by paths, folders and globs, in a stable order.

    `key` is the config key the patterns came from, so a wrong path is reported against it.
    A folder gives its files with a suffix we read (READABLE_SUFFIXES) or, with `all_files`
    (data.format: text), every file that is not binary. What a folder's walk leaves out is
    counted and named — through `log`, or in the error when nothing is left.
    """
    found: list[Path] = []
    patterns = [p for raw in patterns for p in (raw.path if hasattr(raw, "path") else [raw])]  # mixture sources: their paths
    for raw in patterns:
        pattern = expand_path(raw)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"config key '{key}': the pattern {raw!r} matches no files")
            found.extend(p for p in matches if p.is_file())
            continue
        path = Path(pattern)
        if not path.exists():
            raise DataError(f"config key '{key}': data path {raw!r}: no such file or folder; fix the path")
        if path.is_file() or is_datasets_folder(path):
            found.append(path)
            continue
        files, left_out = _folder_files(path, all_files)
        if not files:
            if all_files:
                raise DataError(f"config key '{key}': data folder {raw!r} has no text files: {_describe(left_out)}")
            raise DataError(f"config key '{key}': data folder {raw!r} has no readable files: {_describe(left_out)}, none with "
                            f"a suffix budgetune reads ({', '.join(sorted(READABLE_SUFFIXES))}). {_how_to_read(raw)}")
        if left_out and log is not None:
            log(f"{key} {raw}: reading {len(files)} files, left out {_describe(left_out)}"
                + ("" if all_files else f". {_how_to_read(raw)}"))
        found.extend(files)
    if max_files and len(found) > max_files:
        found = found[:max_files]
    return found


READABLE_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES


def _folder_files(path: Path, all_files: bool) -> tuple[list[Path], dict[str, list[Path]]]:
    """(files read, {reason: files left out}) of a folder's walk."""
    files, left_out = [], {}
    for p in sorted(p for p in path.rglob("*") if p.is_file()):
        suffix = p.suffix.lower()
        if suffix in READABLE_SUFFIXES:
            files.append(p)
        elif not all_files:
            left_out.setdefault(f"suffix {suffix}" if suffix else "no suffix", []).append(p)
        elif _looks_binary(p):
            left_out.setdefault("binary", []).append(p)
        else:
            files.append(p)
    return files, left_out


def _looks_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\x00" in f.read(SNIFF_BYTES)
    except OSError:
        return True


def _describe(left_out: dict[str, list[Path]], shown: int = 3) -> str:
    """'108 files (suffix .gz: 80, no suffix: 28; e.g. a, b, c)'."""
    count = sum(len(v) for v in left_out.values())
    groups = sorted(left_out.items(), key=lambda kv: -len(kv[1]))
    kinds = ", ".join(f"{reason}: {len(paths)}" for reason, paths in groups[:6]) + (", ..." if len(groups) > 6 else "")
    first = [str(p) for _, paths in groups for p in paths][:shown]  # the largest group's first
    examples = ", ".join(first) + (", ..." if count > shown else "")
    return f"{count} file{'s' if count != 1 else ''} ({kinds}; e.g. {examples})"


def _how_to_read(raw: str) -> str:
    return (f"To read such files as plain text, set data.format: text (binary files are then left out, counted) "
            f"or name them with a glob, e.g. '{raw.rstrip('/')}/**/*'")


def read_records(path: Path, text_field: str = "text", skipped: Skipped | None = None) -> Iterator[tuple[dict, str]]:
    """Yield `(record, where)` for every example in one file or `datasets` folder.

    Bad records raise DataError, or are counted in `skipped` when one is given.
    """
    if is_datasets_folder(path):
        yield from _read_datasets_folder(path)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        yield from _read_jsonl(path, skipped)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _read_parquet(path)
    else:
        yield from _read_text(path, text_field, skipped)


def _read_text(path: Path, text_field: str, skipped: Skipped | None) -> Iterator[tuple[dict, str]]:
    data = path.read_bytes()
    if b"\x00" in data[:SNIFF_BYTES]:
        bad(DataError(f"{path}: looks like a binary file, not text; remove it from the data or point at text/JSONL/Parquet files"), skipped)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        bad(DataError(f"{path}:{line}: not valid UTF-8 text; re-encode the file as UTF-8"), skipped)
        return
    if text.strip():
        yield {text_field: text}, str(path)


def _read_jsonl(path: Path, skipped: Skipped | None) -> Iterator[tuple[dict, str]]:
    with open(path, "rb") as handle:
        lineno = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                _skip_rest_of_line(handle)
                bad(DataError(f"{where}: a line longer than {MAX_LINE_BYTES // 2**20} MB; one record should be one "
                              "training document: split it into several lines"), skipped)
                continue
            if not raw.strip():
                continue
            try:
                record = parse_json_line(raw, where)
            except DataError as e:
                bad(e, skipped)
                continue
            yield record, where


def _skip_rest_of_line(handle) -> None:
    while (chunk := handle.readline(2**20)) and not chunk.endswith(b"\n"):
        pass


def parse_json_line(raw: bytes, where: str) -> dict:
    """One JSONL line as a dict, or a DataError that names `where` (never another exception)."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not valid UTF-8 (a binary or UTF-16 file?); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        # json's messages can end in "at" ("Unterminated string starting at"): no second "at" then
        at = " " if e.msg.endswith(" at") else " at "
        raise DataError(f"{where}: not valid JSON ({e.msg}{at}column {e.colno}); each line must be one JSON object") from None
    except ValueError as e:  # JSON that Python refuses: an integer of more than 4300 digits
        raise DataError(f"{where}: not usable JSON ({str(e).split(';')[0]}); fix or remove this line") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; fix or remove this line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file; all mean the same to the user
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    batches = table.iter_batches(batch_size=4096)
    while True:
        try:  # a file can be readable at the start and corrupt further on
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}:row {row}: the Parquet file is corrupt from here on ({e}); rewrite or remove it") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            yield record, f"{path}:row {row}"
            row += 1


def _read_datasets_folder(path: Path) -> Iterator[tuple[dict, str]]:
    import datasets
    import pyarrow as pa

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:  # a broken state.json, arrow file, ...
        raise DataError(f"{path}: not a readable `datasets` folder ({type(e).__name__}: {e}); save it again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has: {', '.join(loaded)}); point at one split's folder")
        loaded = loaded["train"]
    for row, record in enumerate(loaded):
        yield record, f"{path}:row {row}"


CHARS_PER_TOKEN = 3.6  # rough for English/code with a BPE tokenizer; only used before tokenisation


def estimate_unique_tokens(cfg) -> float | None:
    """Tokens in data.train, from file sizes (for planning, before anything is tokenised); None
    when the data is not on this machine (planning for another machine is allowed)."""
    try:
        files = resolve(cfg.data.train, cfg.data.max_files, all_files=cfg.data.format == "text")
    except (DataError, OSError):
        return None
    size = sum(f.stat().st_size if f.is_file() else sum(p.stat().st_size for p in Path(f).rglob("*") if p.is_file()) for f in files)
    return size / CHARS_PER_TOKEN
