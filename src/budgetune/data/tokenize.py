"""Tokenise sources into one flat token array, cached on disk and reused by later runs.

The cache key covers the files (path, size, mtime), the tokenizer (its serialised
vocabulary and chat template) and the format and on_error settings, so any change
re-tokenises. Records skipped under data.on_error: skip are counted in the cache too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .formats import FORMATS, detect_format
from .sources import Skipped, bad, read_records

BATCH = 512


@dataclass
class TokenizedSet:
    """Examples as one flat array: example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len = n_examples + 1
    format: str
    skipped: int = 0  # bad records left out (data.on_error: skip); a subset keeps none
    skip_reasons: list[str] = field(default_factory=list)  # file:line and why, for the first few

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


def content_key(data: TokenizedSet) -> str:
    """A hash of the examples themselves (tokens, loss masks, boundaries): a cache key for what is derived from them."""
    h = hashlib.sha256(b"budgetune-content-v1")
    for a in (data.tokens, data.loss_mask, data.offsets):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


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
    h = hashlib.sha256(b"budgetune-tokens-v2")  # v2: empty text is a bad record, on_error
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(repr((cfg.format, cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field, cfg.on_error,
                   cfg.conversations_field, cfg.instruction_field, cfg.input_field, cfg.output_field,
                   getattr(cfg, "chosen_field", "chosen"), getattr(cfg, "rejected_field", "rejected"),
                   sorted((str(k), str(v)) for k, v in cfg.roles.items()))).encode())
    return h.hexdigest()[:24]


def tokenize_files(files: list[Path], tokenizer, cfg, cache_dir: Path | None = None, log=print) -> TokenizedSet:
    """Tokenise every record of `files`, from the cache when possible."""
    cache_dir = Path(cache_dir or default_cache_dir()) / "tokenized"
    key = _cache_key(files, tokenizer, cfg)
    folder = cache_dir / key
    if (folder / "meta.json").exists():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            cached = TokenizedSet(
                np.load(folder / "tokens.npy"), np.load(folder / "loss_mask.npy"), np.load(folder / "offsets.npy"), meta["format"],
                meta.get("skipped", 0), meta.get("skip_reasons", []),
            )
            if len(cached.tokens) != meta["tokens"] or len(cached) != meta["examples"]:
                raise ValueError(f"{len(cached.tokens)} tokens and {len(cached)} examples on disk, {meta['tokens']} and {meta['examples']} written")
            log(f"tokenised data from cache ({meta['examples']} examples, {meta['tokens']} tokens): {folder}")
            return cached
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:  # the disk damaged it: rebuild, don't crash
            log(f"the tokenisation cache entry {folder} is damaged ({type(e).__name__}: {e}); tokenising again")
            shutil.rmtree(folder, ignore_errors=True)
    data = _tokenize(files, tokenizer, cfg)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config key 'data.cache_dir' (or BUDGETUNE_CACHE): cannot create the cache folder {cache_dir} ({e}); "
                          "point it at a writable folder") from None
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    try:
        np.save(tmp / "tokens.npy", data.tokens)
        np.save(tmp / "loss_mask.npy", data.loss_mask)
        np.save(tmp / "offsets.npy", data.offsets)
        meta = {"examples": len(data), "tokens": int(len(data.tokens)), "format": data.format, "files": [str(f) for f in files[:50]],
                "skipped": data.skipped, "skip_reasons": data.skip_reasons}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").exists():  # another process may have won the race; otherwise re-raise
            raise
    return data


def _tokenize(files: list[Path], tokenizer, cfg) -> TokenizedSet:
    """Read, check and encode every record. Records are encoded in batches, so a bad record
    can surface after later lines were read; the batch is flushed before any error is raised
    or counted, so the error raised, and the skip reasons kept, are the first in file order."""
    fmt_name = None if cfg.format == "auto" else cfg.format
    skipped = Skipped() if cfg.on_error == "skip" else None
    unread = Skipped() if skipped is not None else None  # what the reader skips, taken into `skipped` in order
    chunks_tokens, chunks_mask, lengths = [], [], []
    records, wheres = [], []

    def flush():
        if not records:
            return
        batch, places = records[:], wheres[:]
        records.clear()
        wheres.clear()
        for ids, mask in _encode(FORMATS[fmt_name], batch, places, tokenizer, cfg, skipped):
            if len(ids) < 2:
                continue  # nothing to predict
            chunks_tokens.append(np.asarray(ids, dtype=np.int32))
            chunks_mask.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(len(ids))

    def take_unread():
        if unread is not None and unread.count:
            flush()
            skipped.absorb(unread)

    try:
        for path in files:
            for record, where in read_records(path, cfg.text_field, unread):
                take_unread()
                try:
                    if fmt_name is None:
                        fmt_name = detect_format(record, where, cfg)
                    elif not FORMATS[fmt_name].detect(record, cfg):
                        detected = detect_format(record, where, cfg)
                        raise DataError(f"{where}: this record is {detected} data but earlier records are {fmt_name}; use one format per dataset")
                except DataError as e:
                    flush()
                    bad(e, skipped)
                    continue
                records.append(record)
                wheres.append(where)
                if len(records) >= BATCH:
                    flush()
            take_unread()
        flush()
    except DataError:
        flush()  # a bad record still waiting in the batch comes before the one that stopped reading
        raise
    if not lengths:
        names = ", ".join(str(f) for f in files[:3])
        more = " ..." if len(files) > 3 else ""
        if skipped is not None and skipped.count:
            raise DataError(f"no usable examples in {names}{more}: {skipped.count} bad records were skipped (data.on_error: skip); "
                            f"the first: {skipped.reasons[0]}")
        raise DataError(f"no examples found in {names}{more}: the files are empty")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSet(np.concatenate(chunks_tokens), np.concatenate(chunks_mask), offsets, fmt_name,
                        skipped.count if skipped else 0, list(skipped.reasons) if skipped else [])


def _encode(fmt, records: list[dict], wheres: list[str], tokenizer, cfg, skipped: Skipped | None) -> list:
    """Encode a batch; if a record in it is bad, go record by record so the error names the
    first bad one (or each bad one is skipped) and the good ones are kept."""
    try:
        return fmt.encode(records, wheres, tokenizer, cfg)
    except DataError as batch_error:
        first_error = batch_error
    out, found = [], False
    for record, where in zip(records, wheres):
        try:
            out.extend(fmt.encode([record], [where], tokenizer, cfg))
        except DataError as e:
            found = True
            bad(e, skipped)
    if not found:  # the batch failed but no single record does: report what the batch said
        raise first_error
    return out
