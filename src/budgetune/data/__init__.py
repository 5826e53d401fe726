"""Data: sources → formats → tokenise (cached) → held-out split → rows (packed or padded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .packing import IGNORE, Rows, build_rows, pack_examples
from .sources import read_records, resolve
from .tokenize import TokenizedSet, tokenize_files

__all__ = ["DataBundle", "prepare_data", "iter_texts", "Rows", "pack_examples", "build_rows", "IGNORE", "TokenizedSet"]


@dataclass
class DataBundle:
    train: Rows
    eval: Rows | None
    format: str
    train_examples: int
    eval_examples: int

    def summary(self) -> dict:
        return {
            "format": self.format,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "train_rows": len(self.train),
            "train_tokens": int(self.train.real_tokens.sum()),
            "eval_tokens": int(self.eval.real_tokens.sum()) if self.eval is not None else 0,
            "padding_fraction": round(self.train.padding_fraction, 4),
            "truncated_examples": self.train.truncated + (self.eval.truncated if self.eval is not None else 0),
        }


def prepare_data(cfg, tokenizer, seed: int = 0, log=print) -> DataBundle:
    """Tokenise train (and eval) data and build rows; hold out a split when no eval data is given."""
    dcfg = cfg.data
    cache = dcfg.cache_dir
    train_set = tokenize_files(resolve(dcfg.train, dcfg.max_files), tokenizer, dcfg, cache, log=log)
    if dcfg.eval:
        eval_set = tokenize_files(resolve(dcfg.eval), tokenizer, dcfg, cache, log=log)
    else:
        train_set, eval_set = split_heldout(train_set, dcfg.eval_fraction, seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_rows = build_rows(train_set, dcfg.seq_len, dcfg.pack, pad_id)
    # eval rows are always packed: the loss is the same (tested) and it is cheaper
    eval_rows = build_rows(eval_set, dcfg.seq_len, True, pad_id) if len(eval_set) else None
    return DataBundle(train_rows, eval_rows, train_set.format, len(train_set), len(eval_set))


def split_heldout(data: TokenizedSet, fraction: float, seed: int) -> tuple[TokenizedSet, TokenizedSet]:
    """A seeded held-out split by whole examples (documents never straddle the split)."""
    n = len(data)
    n_eval = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(order[n_eval:])), data.subset(np.sort(order[:n_eval]))


def iter_texts(cfg, limit_bytes: int = 0) -> Iterator[str]:
    """Raw text of the training data (for training a tokenizer), stopping after limit_bytes."""
    seen = 0
    for path in resolve(cfg.data.train, cfg.data.max_files):
        for record, _ in read_records(path, cfg.data.text_field):
            for key in (cfg.data.text_field, cfg.data.prompt_field, cfg.data.completion_field):
                if isinstance(record.get(key), str):
                    yield record[key]
                    seen += len(record[key])
            for m in record.get(cfg.data.messages_field) or []:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    yield m["content"]
                    seen += len(m["content"])
            if limit_bytes and seen >= limit_bytes:
                return
