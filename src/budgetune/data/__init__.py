"""Data: sources → formats → tokenise (cached) → held-out split → rows (packed or padded)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError
from .dedup import dedup
from .formats import DEFAULT_CHAT_TEMPLATE
from .mixture import check_formats, concat, mix, shares, sources_of, token_lengths
from .mixture import per_source as per_source_tokens

CHAT_FORMATS = ("chat", "sharegpt", "alpaca")  # rendered with the tokenizer's chat template
from .packing import IGNORE, Rows, build_rows, pack_examples, unpacked_row_lengths
from .select import select
from .sources import Skipped, read_records, resolve
from .tokenize import TokenizedSet, tokenize_files

__all__ = ["DataBundle", "prepare_data", "row_lengths", "iter_texts", "Rows", "pack_examples", "build_rows", "IGNORE", "TokenizedSet"]


@dataclass
class DataBundle:
    train: Rows
    eval: Rows | None
    format: str
    train_examples: int
    eval_examples: int
    skipped: int = 0  # bad records left out under data.on_error: skip
    skip_reasons: tuple[str, ...] = ()  # file:line and why, for the first few
    sources: dict | None = None  # per source: examples, training tokens, share, epochs (mixtures)
    dedup: dict | None = None  # what data.dedup dropped
    selection: dict | None = None  # what data.select kept, and its scoring time

    def summary(self) -> dict:
        out = {
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
        for key in ("sources", "dedup", "selection"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @property
    def truncated(self) -> int:
        """Instruction/chat examples cut to data.seq_len (long text is split into rows instead)."""
        return self.train.truncated + (self.eval.truncated if self.eval is not None else 0)


DATA_BUDGET = "data_budget.json"  # in the run folder: the tokens the budget bought when the data was chosen


def prepare_data(cfg, tokenizer, seed: int = 0, log=print, model=None, budget_tokens=None, run_dir=None) -> DataBundle:
    """Tokenise the sources, drop duplicates, hold out a split (unless data.eval is given), select
    (data.select, scoring with `model`), mix by weight, and build rows.

    `budget_tokens()`: the training tokens the rest of the budget buys (planner estimate) or None;
    it sizes `data.select.fraction: auto` and the mixture. With `run_dir`, its answer is kept
    there, so a resumed run chooses exactly the data its first attempt did.
    """
    dcfg = cfg.data
    budget_tokens = _asked_once(budget_tokens, run_dir)
    cache = dcfg.cache_dir
    every = dcfg.format == "text"  # text: a folder's files of any suffix (binary ones left out, counted)
    sources, sets = tokenized_sources(dcfg, tokenizer, log)
    fmt = check_formats(sets, sources)
    pool, source = concat(sets, fmt) if len(sets) > 1 else (sets[0], np.zeros(len(sets[0]), dtype=np.int64))
    dedup_info = None
    if dcfg.dedup != "off":
        found = dedup(pool, tokenizer, dcfg.dedup, dcfg.near_threshold, cache, log=log)
        pool, source = pool.subset(found.kept), source[found.kept]
        dedup_info = found.summary()
        log(f"data.dedup {dcfg.dedup}: dropped {found.exact} exact and {found.near} near duplicate(s) of "
            f"{len(found.kept) + found.dropped} examples" + (f"; e.g. {found.examples[0]}" if found.examples else ""))
    if dcfg.eval:
        eval_set = tokenize_files(resolve(dcfg.eval, key="data.eval", all_files=every, log=log), tokenizer, dcfg, cache, log=log)
        sets.append(eval_set)
        train_idx = np.arange(len(pool))
    else:
        train_idx, eval_idx = split_indices(len(pool), dcfg.eval_fraction, seed)
        eval_set = pool.subset(eval_idx)
    train_set, source = pool.subset(train_idx), source[train_idx]
    lengths = token_lengths(train_set, dcfg.seq_len)
    unique = [float(lengths[source == s].sum()) for s in range(len(sources))]
    share = shares(sources, unique, dcfg.replay_weight)
    selection = None
    if dcfg.select.method != "off":
        target = _target_set(dcfg, tokenizer, train_set.format, log) if dcfg.select.target else eval_set
        keep, report = select(train_set, source, share, dcfg.select, dcfg.seq_len, model=model, target=target,
                              budget_tokens=budget_tokens, seed=seed, cache_dir=cache, log=log)
        train_set, source, lengths = train_set.subset(keep), source[keep], lengths[keep]
        selection = report.summary()
    picked = np.arange(len(train_set))
    if share is not None:
        bought = budget_tokens() if budget_tokens is not None else None
        total = float(lengths.sum()) if bought is None else min(float(lengths.sum()), bought)
        picked = mix(lengths, source, share, total, seed)
        train_set = train_set.subset(picked)
    per_source = per_source_tokens(lengths, source, picked, sources, unique) if len(sources) > 1 else None
    if per_source:
        log("data sources: " + "; ".join(f"{name}: {v['tokens']:,} tokens ({100 * v['share']:.0f}%, {v['epochs']:.2f} epochs)"
                                         for name, v in per_source.items()))
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
    bundle = DataBundle(train_rows, eval_rows, train_set.format, len(train_set), len(eval_set), skipped, reasons,
                        per_source, dedup_info, selection)
    if skipped:
        log(f"data.on_error skip: left out {skipped} bad record(s); the first: " + "; ".join(reasons))
    if bundle.truncated:
        log(f"{bundle.truncated} example(s) longer than data.seq_len ({dcfg.seq_len} tokens) were truncated to it "
            "(their ends are not learned); raise data.seq_len to keep them whole")
    return bundle


def row_lengths(cfg, tokenizer, log=print) -> np.ndarray:
    """Real tokens in each row of data.train when rows are not packed (one example, or one preference
    pair, per row; what `build_rows(..., pack=False)` gives), for the planner's speed probe.

    Tokenises through the same cache as `prepare_data`, which then reads it instead of tokenising
    again. All of data.train's examples count: the held-out split, data.dedup, data.select and the
    mixture's weights change which rows a run has, not the lengths rows have (taken as the same)."""
    _, sets = tokenized_sources(cfg.data, tokenizer, log)
    return np.concatenate([unpacked_row_lengths(s, cfg.data.seq_len) for s in sets])


def tokenized_sources(dcfg, tokenizer, log=print) -> tuple[list, list[TokenizedSet]]:
    """(data.train's sources, each one tokenised through the cache): one place, so that what
    `row_lengths` tokenises for the planner is the cache entry `prepare_data` then reads."""
    every = dcfg.format == "text"  # text: a folder's files of any suffix (binary ones left out, counted)
    sources = sources_of(dcfg)
    return sources, [tokenize_files(resolve(src.patterns, dcfg.max_files, src.key, every, log), tokenizer, src.cfg,
                                    dcfg.cache_dir, log=log) for src in sources]


def _asked_once(budget_tokens, run_dir):
    """`budget_tokens`, asked at most once per run and remembered in RUN_DIR/data_budget.json (a resumed
    run's clock has moved on: asking again would give another answer, and other data)."""
    if budget_tokens is None:
        return None
    path = Path(run_dir) / DATA_BUDGET if run_dir is not None else None
    answer: dict = {}

    def ask():
        if "tokens" not in answer:
            if path is not None and path.exists():
                answer["tokens"] = json.loads(path.read_text())["tokens"]
            else:
                answer["tokens"] = budget_tokens()
                if path is not None and path.parent.is_dir():
                    tmp = path.with_name(f".tmp-{os.getpid()}-{DATA_BUDGET}")
                    tmp.write_text(json.dumps({"tokens": answer["tokens"]}))
                    os.replace(tmp, path)
        return answer["tokens"]

    return ask


def _target_set(dcfg, tokenizer, fmt: str, log) -> TokenizedSet:
    """data.select.target's examples, which must be of the training data's format."""
    try:
        target = tokenize_files(resolve(dcfg.select.target, key="data.select.target"), tokenizer, dcfg, dcfg.cache_dir, log=log)
    except DataError as e:
        raise DataError(f"config key 'data.select.target': {e}") from None
    if (target.format == "text") != (fmt == "text"):
        raise DataError(f"config key 'data.select.target': the target examples are {target.format} data but the training "
                        f"data is {fmt}; give target examples in the training data's format")
    return target


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) example indices of a seeded split, each ascending."""
    n_eval = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def split_heldout(data: TokenizedSet, fraction: float, seed: int) -> tuple[TokenizedSet, TokenizedSet]:
    """A seeded held-out split by whole examples (documents never straddle the split)."""
    train, held = split_indices(len(data), fraction, seed)
    return data.subset(train), data.subset(held)


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
