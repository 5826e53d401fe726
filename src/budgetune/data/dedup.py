"""Deduplication before training (METHODS.md §5): exact and near-duplicate examples.

Both work on each example's text, decoded from its tokens and normalised (lower case,
runs of whitespace collapsed), across all sources together, before the held-out split (so
a duplicate never sits on both sides of it). The first occurrence is kept.

- exact: a SHA-1 of the normalised text.
- near: MinHash signatures of word 3-grams and locality-sensitive hashing, through
  `datasketch` (a maintained, widely used MinHash/LSH library: its `MinHashLSH` finds the
  candidates whose estimated Jaccard similarity passes data.near_threshold, in about
  linear time, instead of comparing every pair). Exact duplicates are dropped first.

The decision (which examples stay) is cached beside the tokenisation cache, keyed by the
tokens themselves and the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tokenize import TokenizedSet, content_key, default_cache_dir

NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about ±0.09 (1/√128)
SHINGLE = 3  # words per shingle
SHOWN = 3  # dropped examples quoted in the log and summary
_SPACE = re.compile(r"\s+")


@dataclass
class DedupReport:
    mode: str
    kept: np.ndarray  # indices of the examples kept, ascending
    exact: int = 0  # dropped as exact duplicates
    near: int = 0  # dropped as near duplicates
    examples: list[str] = field(default_factory=list)  # a few dropped texts (shortened), for the log

    @property
    def dropped(self) -> int:
        return self.exact + self.near

    def summary(self) -> dict:
        return {"mode": self.mode, "dropped_exact": self.exact, "dropped_near": self.near, "examples": self.examples}


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def texts_of(data: TokenizedSet, tokenizer) -> list[str]:
    """Each example's text, special tokens left out."""
    ids = [data.tokens[s:e].tolist() for s, e in zip(data.offsets[:-1], data.offsets[1:])]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def find_duplicates(texts: list[str], mode: str, threshold: float = 0.8) -> DedupReport:
    """Which of `texts` to keep under `mode` ('exact' or 'near'); first occurrences win."""
    norm = [normalise(t) for t in texts]
    seen: dict[str, int] = {}
    keep, exact, near, shown = [], 0, 0, []
    for i, t in enumerate(norm):
        h = hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest()
        if h in seen:
            exact += 1
            if len(shown) < SHOWN:
                shown.append(f"exact duplicate of example {seen[h]}: {_short(texts[i])}")
            continue
        seen[h] = i
        keep.append(i)
    if mode == "near" and len(keep) > 1:
        from datasketch import MinHash, MinHashLSH

        shingles = [_shingles(norm[i]) for i in keep]
        hashes = MinHash.bulk(shingles, num_perm=NUM_PERM, seed=1)
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        still, kept_hash = [], {}
        for i, mh in zip(keep, hashes):
            # LSH gives candidates; the estimated Jaccard similarity decides
            match = next((j for j in sorted(lsh.query(mh)) if kept_hash[j].jaccard(mh) >= threshold), None)
            if match is not None:
                near += 1
                if len(shown) < SHOWN:
                    shown.append(f"near duplicate of example {match}: {_short(texts[i])}")
                continue
            lsh.insert(i, mh)
            still.append(i)
            kept_hash[i] = mh
        keep = still
    return DedupReport(mode, np.asarray(keep, dtype=np.int64), exact, near, shown)


def _shingles(text: str) -> list[bytes]:
    words = text.split(" ")
    if len(words) <= SHINGLE:
        return [text.encode("utf-8", "surrogatepass")]
    return [" ".join(words[k : k + SHINGLE]).encode("utf-8", "surrogatepass") for k in range(len(words) - SHINGLE + 1)]


def _short(text: str, n: int = 80) -> str:
    text = _SPACE.sub(" ", text).strip()
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def dedup(data: TokenizedSet, tokenizer, mode: str, threshold: float, cache_dir=None, log=print) -> DedupReport:
    """Find duplicates in `data` (cached); the caller keeps `report.kept`."""
    folder = Path(cache_dir or default_cache_dir()) / "dedup"
    key = hashlib.sha256(f"dedup-v1|{content_key(data)}|{mode}|{threshold}|{NUM_PERM}|{SHINGLE}".encode()).hexdigest()[:24]
    path = folder / f"{key}.json"
    if path.exists():
        meta = json.loads(path.read_text())
        log(f"dedup ({mode}) from cache: {path}")
        return DedupReport(mode, np.asarray(meta["kept"], dtype=np.int64), meta["exact"], meta["near"], meta["examples"])
    report = find_duplicates(texts_of(data, tokenizer), mode, threshold)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump({"kept": report.kept.tolist(), "exact": report.exact, "near": report.near, "examples": report.examples}, f)
    os.replace(tmp, path)
    return report
