"""Padding-free packing (METHODS.md §5) and the padded baseline.

Packed rows hold several examples back to back; `position_ids` restart at 0 for each
example, which transformers turns into a block-diagonal causal mask (or flash-attention
varlen boundaries), so no token attends across examples. The first token of every example
gets no label: in a packed row it would otherwise be "predicted" from the previous
example. With that, the packed loss equals the unpacked loss on the same examples.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .tokenize import TokenizedSet

IGNORE = -100


def split_long(data: TokenizedSet, seq_len: int, chunk: bool) -> tuple[list[tuple[int, int]], int]:
    """(start, end) spans of examples no longer than seq_len; and how many were truncated.

    Plain text is cut into seq_len pieces (every token is kept); instruction examples
    are truncated (a completion cut from its prompt is not a useful example).
    """
    spans, truncated = [], 0
    for start, end in zip(data.offsets[:-1].tolist(), data.offsets[1:].tolist()):
        if end - start <= seq_len:
            spans.append((start, end))
        elif chunk:
            spans.extend((s, min(s + seq_len, end)) for s in range(start, end, seq_len) if min(s + seq_len, end) - s >= 2)
        else:
            spans.append((start, start + seq_len))
            truncated += 1
    return spans, truncated


def pack_examples(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the fullest row it fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row id), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


@dataclass
class Rows:
    """Training rows ready to batch. Packed rows have position_ids and no attention mask;
    padded rows have an attention mask."""

    input_ids: np.ndarray  # [rows, seq_len] int64
    labels: np.ndarray  # [rows, seq_len] int64, IGNORE where no loss
    position_ids: np.ndarray | None
    attention_mask: np.ndarray | None
    real_tokens: np.ndarray  # [rows] tokens that are not padding
    truncated: int = 0
    # preference pairs: per token, 2k+1 in pair k's chosen half, 2k+2 in its rejected half, 0 padding
    segments: np.ndarray | None = None
    # per row and pair, the reference model's (chosen, rejected) log-probs when they were computed once (DPO, full FT)
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def padding_fraction(self) -> float:
        total = self.input_ids.size
        return 1.0 - float(self.real_tokens.sum()) / total if total else 0.0

    def take(self, indices) -> "Rows":
        """The rows `indices`, as Rows of their own."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Rows(self.input_ids[idx], self.labels[idx], pick(self.position_ids), pick(self.attention_mask), self.real_tokens[idx],
                    segments=pick(self.segments), reference=pick(self.reference))

    @property
    def pairs(self) -> np.ndarray:
        """Preference pairs in each row."""
        return self.segments.max(axis=1) // 2

    def batch(self, indices) -> dict:
        """Tensors for rows `indices`; padded rows are trimmed to the longest in the batch."""
        import torch

        idx = np.asarray(indices)
        out = {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
        if self.segments is not None:  # preference pairs: trimmed to the longest row (trailing padding carries nothing)
            width = int(self.real_tokens[idx].max())
            out = {k: v[:, :width] for k, v in out.items()}
            out["position_ids"] = self.position_ids[idx, :width]
            out["segments"] = self.segments[idx, :width]
            if self.reference is not None:
                out["reference_logps"] = self.reference[idx]
        elif self.position_ids is not None:
            out["position_ids"] = self.position_ids[idx]
        else:
            width = int(self.attention_mask[idx].sum(1).max())
            out = {k: v[:, :width] for k, v in out.items()}
            out["attention_mask"] = self.attention_mask[idx, :width]
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def build_rows(data: TokenizedSet, seq_len: int, pack: bool, pad_id: int) -> Rows:
    if data.format == "preference":
        return build_pair_rows(data, seq_len, pack, pad_id)
    chunk = data.format == "text"
    spans, truncated = split_long(data, seq_len, chunk)
    lengths = [e - s for s, e in spans]
    groups = pack_examples(lengths, seq_len) if pack else [[i] for i in range(len(spans))]
    n = len(groups)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((n, seq_len), dtype=np.int64)
    attention = np.zeros((n, seq_len), dtype=np.int64)
    real = np.zeros(n, dtype=np.int64)
    for r, group in enumerate(groups):
        col = 0
        for i in group:
            s, e = spans[i]
            k = e - s
            ids = data.tokens[s:e]
            input_ids[r, col : col + k] = ids
            target = np.where(data.loss_mask[s:e] > 0, ids, IGNORE)
            target[0] = IGNORE  # never predicted from inside its own example
            labels[r, col : col + k] = target
            positions[r, col : col + k] = np.arange(k)
            col += k
        attention[r, :col] = 1
        real[r] = col
        positions[r, col:] = np.arange(seq_len - col)  # padding is its own segment (and carries no labels)
    return Rows(
        input_ids=input_ids,
        labels=labels,
        position_ids=positions if pack else None,
        attention_mask=None if pack else attention,
        real_tokens=real,
        truncated=truncated,
    )


def pair_halves(data: TokenizedSet, seq_len: int) -> tuple[list[list[tuple[int, int]]], int]:
    """Each preference pair's (chosen, rejected) token spans, truncated as `build_pair_rows` does; and
    how many pairs were truncated."""
    from .formats import PREF_REJECTED_PROMPT

    halves, truncated = [], 0
    for start, end in zip(data.offsets[:-1].tolist(), data.offsets[1:].tolist()):
        split = start + int(np.argmax(data.loss_mask[start:end] >= PREF_REJECTED_PROMPT))
        parts = [(start, split), (split, end)]
        if end - start > seq_len:
            parts = [(s, min(e, s + seq_len // 2)) for s, e in parts]
            truncated += 1
        halves.append(parts)
    return halves, truncated


def unpacked_row_lengths(data: TokenizedSet, seq_len: int) -> np.ndarray:
    """The real (non-padding) tokens of each row `build_rows(data, seq_len, pack=False)` makes, without
    building the rows: what the planner needs to time a padded batch of the run's own shape."""
    if data.format == "preference":
        return np.array([sum(e - s for s, e in parts) for parts in pair_halves(data, seq_len)[0]], dtype=np.int64)
    spans, _ = split_long(data, seq_len, chunk=data.format == "text")
    return np.array([e - s for s, e in spans], dtype=np.int64)


def build_pair_rows(data: TokenizedSet, seq_len: int, pack: bool, pad_id: int) -> Rows:
    """Rows of preference pairs: each pair whole in one row (chosen half, then rejected half, positions
    restarting at each half, so neither half sees the other), `segments` telling the halves apart.

    pack=True fills rows with several pairs (best-fit decreasing); pack=False gives each pair its own
    row, trimmed per batch to the longest. Packing is the default, as for SFT: it computes no padding.
    Which is faster is measured by `benchmarks/preference.py` (its layout part): on SmolLM2 on the CPU
    (2026-11-25) packed pairs ran at 149 real tokens/s, one pair per row at 143 (docs/benchmarks.md).
    A pair longer than seq_len has each half truncated to seq_len // 2 tokens (counted).
    """
    halves, truncated = pair_halves(data, seq_len)
    lengths = [sum(e - s for s, e in parts) for parts in halves]
    groups = pack_examples(lengths, seq_len) if pack else [[i] for i in range(len(halves))]
    n = len(groups)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((n, seq_len), dtype=np.int64)
    segments = np.zeros((n, seq_len), dtype=np.int16)
    real = np.zeros(n, dtype=np.int64)
    for r, group in enumerate(groups):
        col = 0
        for k, i in enumerate(group):
            for side, (s, e) in enumerate(halves[i]):
                length = e - s
                ids = data.tokens[s:e]
                input_ids[r, col : col + length] = ids
                target = np.where(data.loss_mask[s:e] & 1, ids, IGNORE)
                target[0] = IGNORE
                labels[r, col : col + length] = target
                positions[r, col : col + length] = np.arange(length)
                segments[r, col : col + length] = 2 * k + 1 + side
                col += length
        real[r] = col
        positions[r, col:] = np.arange(seq_len - col)
    return Rows(input_ids=input_ids, labels=labels, position_ids=positions, attention_mask=None, real_tokens=real,
                truncated=truncated, segments=segments)
