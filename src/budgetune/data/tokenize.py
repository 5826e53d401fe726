"""Tokenise sources into one flat token array, cached on disk and reused by later runs.

The cache key covers the files (path, size, mtime), the tokenizer (its serialised
vocabulary and chat template) and the format settings, so any change re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .formats import FORMATS, detect_format
from .sources import read_records

BATCH = 512


@dataclass
class TokenizedSet:
    """Examples as one flat array: example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len = n_examples + 1
    format: str

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, indices: np.ndarray) -> "TokenizedSet":
        lengths = self.lengths()[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]) if len(indices) else np.zeros(0, np.int64)
        return TokenizedSet(self.tokens[gather], self.loss_mask[gather], offsets, self.format)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BUDGETUNE_CACHE", Path.home() / ".cache" / "budgetune"))


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()[:16]


def _cache_key(files: list[Path], tokenizer, cfg) -> str:
    h = hashlib.sha256(b"budgetune-tokens-v1")
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(repr((cfg.format, cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field)).encode())
    return h.hexdigest()[:24]


def tokenize_files(files: list[Path], tokenizer, cfg, cache_dir: Path | None = None, log=print) -> TokenizedSet:
    """Tokenise every record of `files`, from the cache when possible."""
    cache_dir = Path(cache_dir or default_cache_dir()) / "tokenized"
    key = _cache_key(files, tokenizer, cfg)
    folder = cache_dir / key
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        log(f"tokenised data from cache ({meta['examples']} examples, {meta['tokens']} tokens): {folder}")
        return TokenizedSet(
            np.load(folder / "tokens.npy"), np.load(folder / "loss_mask.npy"), np.load(folder / "offsets.npy"), meta["format"]
        )
    data = _tokenize(files, tokenizer, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    try:
        np.save(tmp / "tokens.npy", data.tokens)
        np.save(tmp / "loss_mask.npy", data.loss_mask)
        np.save(tmp / "offsets.npy", data.offsets)
        meta = {"examples": len(data), "tokens": int(len(data.tokens)), "format": data.format, "files": [str(f) for f in files[:50]]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").exists():  # another process may have won the race; otherwise re-raise
            raise
    return data


def _tokenize(files: list[Path], tokenizer, cfg) -> TokenizedSet:
    fmt_name = None if cfg.format == "auto" else cfg.format
    chunks_tokens, chunks_mask, lengths = [], [], []
    records, wheres = [], []

    def flush():
        for ids, mask in FORMATS[fmt_name].encode(records, wheres, tokenizer, cfg):
            if len(ids) < 2:
                continue  # nothing to predict
            chunks_tokens.append(np.asarray(ids, dtype=np.int32))
            chunks_mask.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(len(ids))
        records.clear()
        wheres.clear()

    for path in files:
        for record, where in read_records(path, cfg.text_field):
            if fmt_name is None:
                fmt_name = detect_format(record, where, cfg)
            elif not FORMATS[fmt_name].detect(record, cfg):
                detected = detect_format(record, where, cfg)
                raise DataError(f"{where}: this record is {detected} data but earlier records are {fmt_name}; use one format per dataset")
            records.append(record)
            wheres.append(where)
            if len(records) >= BATCH:
                flush()
    if records:
        flush()
    if not lengths:
        names = ", ".join(str(f) for f in files[:3])
        raise DataError(f"no examples found in {names}{' ...' if len(files) > 3 else ''}: the files are empty")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSet(np.concatenate(chunks_tokens), np.concatenate(chunks_mask), offsets, fmt_name)
