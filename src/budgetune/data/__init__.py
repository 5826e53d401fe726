"""Data: sources → formats → tokenise (cached) → held-out split → rows (packed or padded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import DataError

from .formats import DEFAULT_CHAT_TEMPLATE

CHAT_FORMATS = ("chat", "sharegpt", "alpaca")  # rendered with the tokenizer's chat template
from .packing import IGNORE, Rows, build_rows, pack_examples
from .sources import Skipped, read_records, resolve
from .tokenize import TokenizedSet, tokenize_files

__all__ = ["DataBundle", "prepare_data", "iter_texts", "Rows", "pack_examples", "build_rows", "IGNORE", "TokenizedSet"]


@dataclass
class DataBundle:
    train: Rows
    eval: Rows | None
    format: str
    train_examples: int
    eval_examples: int
    skipped: int = 0  # bad records left out under data.on_error: skip
    skip_reasons: tuple[str, ...] = ()  # file:line and why, for the first few

    def summary(self) -> dict:
        return {
            "format": self.format,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "train_rows": len(self.train),
            "train_tokens": int(self.train.real_tokens.sum()),
            "eval_tokens": int(self.eval.real_tokens.sum()) if self.eval is not None else 0,
            "padding_fraction": round(self.train.padding_fraction, 4),
            "truncated_examples": self.truncated,
            "skipped_records": self.skipped,
            "skipped_reasons": list(self.skip_reasons),
        }

    @property
    def truncated(self) -> int:
        """Instruction/chat examples cut to data.seq_len (long text is split into rows instead)."""
        return self.train.truncated + (self.eval.truncated if self.eval is not None else 0)


def prepare_data(cfg, tokenizer, seed: int = 0, log=print) -> DataBundle:
    """Tokenise train (and eval) data and build rows; hold out a split when no eval data is given."""
    dcfg = cfg.data
    cache = dcfg.cache_dir
    every = dcfg.format == "text"  # text: a folder's files of any suffix (binary ones left out, counted)
    train_set = tokenize_files(resolve(dcfg.train, dcfg.max_files, "data.train", every, log), tokenizer, dcfg, cache, log=log)
    sets = [train_set]
    if dcfg.eval:
        eval_set = tokenize_files(resolve(dcfg.eval, key="data.eval", all_files=every, log=log), tokenizer, dcfg, cache, log=log)
        sets.append(eval_set)
    else:
        train_set, eval_set = split_heldout(train_set, dcfg.eval_fraction, seed)
    if (train_set.format in CHAT_FORMATS and getattr(tokenizer, "budgetune_default_template", False)
            and getattr(tokenizer, "chat_template", None) == DEFAULT_CHAT_TEMPLATE):
        log("chat data rendered with budgetune's default ChatML template (the tokenizer has none); "
            "set tokenizer.chat_template to use another")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_rows = build_rows(train_set, dcfg.seq_len, dcfg.pack, pad_id)
    # eval rows are always packed: the loss is the same (tested) and it is cheaper
    eval_rows = build_rows(eval_set, dcfg.seq_len, True, pad_id) if len(eval_set) else None
    skipped = sum(s.skipped for s in sets)
    reasons = tuple(r for s in sets for r in s.skip_reasons)[: Skipped.SHOWN]
    bundle = DataBundle(train_rows, eval_rows, train_set.format, len(train_set), len(eval_set), skipped, reasons)
    if skipped:
        log(f"data.on_error skip: left out {skipped} bad record(s); the first: " + "; ".join(reasons))
    if bundle.truncated:
        log(f"{bundle.truncated} example(s) longer than data.seq_len ({dcfg.seq_len} tokens) were truncated to it "
            "(their ends are not learned); raise data.seq_len to keep them whole")
    return bundle


def split_heldout(data: TokenizedSet, fraction: float, seed: int) -> tuple[TokenizedSet, TokenizedSet]:
    """A seeded held-out split by whole examples (documents never straddle the split)."""
    n = len(data)
    n_eval = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(order[n_eval:])), data.subset(np.sort(order[:n_eval]))


def iter_texts(cfg, limit_bytes: int = 0) -> Iterator[str]:
    """Raw text of the training data (for training a tokenizer), stopping after limit_bytes.

    Each record's format is told first (data.format, or detected), so data no format can
    read stop here, naming file:line, before any tokenizer is trained on them; so do data
    without a single text."""
    from .formats import FORMATS, detect_format
    from .sources import bad

    seen, files = 0, resolve(cfg.data.train, cfg.data.max_files, "data.train", all_files=cfg.data.format == "text")
    # bad records are reported (or counted) by tokenisation, which reads the same files again
    skipped = Skipped() if cfg.data.on_error == "skip" else None
    found = False
    for path in files:
        for record, where in read_records(path, cfg.data.text_field, skipped):
            try:
                if cfg.data.format == "auto":
                    fmt = FORMATS[detect_format(record, where, cfg.data)]
                else:
                    fmt = FORMATS[cfg.data.format]
                    if not fmt.detect(record, cfg.data):
                        raise DataError(f"{where}: this record is {detect_format(record, where, cfg.data)} data, "
                                        f"not {cfg.data.format} (data.format); set data.format to match the data")
            except DataError as e:
                bad(e, skipped)
                continue
            for text in fmt.texts(record, cfg.data):
                if isinstance(text, str) and text.strip() and _is_text(text):
                    found = True
                    yield text
                    seen += len(text)
            if limit_bytes and seen >= limit_bytes:
                return
    if not found:
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"no examples found in {names}: no text to train a tokenizer on (the files are empty"
                        + (f", or all {skipped.count} records were bad; the first: {skipped.reasons[0]}" if skipped and skipped.count else "")
                        + ")")


def _is_text(value: str) -> bool:
    """False for strings with lone surrogates (from JSON escapes): tokenizers cannot take them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
