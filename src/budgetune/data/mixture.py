"""Sources and weighted mixtures (METHODS.md §5: under a token budget, the mixture matters).

`data.train` lists sources: a plain path (or glob) is a source of its own; a mapping
`{path, weight, format, *_field}` is a source with its own format and share of the
training tokens. `data.replay` adds old-domain data with `data.replay_weight` of the
tokens, for continual pre-training: a model trained on new data alone first loses
old-domain ability (the "stability gap") before it regains some; mixing a few percent
of the old distribution back in keeps it (replay), at the cost of those tokens.

Mixing is in token terms: with weights w_s (normalised), one mixture epoch of T tokens
takes w_s·T tokens from source s, walking through s epoch by epoch (a fresh seeded
permutation of its examples each time; no example repeats before all of that source has
been seen). T is what the budget buys when the planner can say (capped at the tokens the
sources hold, to bound memory), else the tokens the sources hold. Without weights or
replay, sources are simply concatenated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import SourceConfig
from ..errors import ConfigError
from .tokenize import TokenizedSet

FIELDS = ("format", "text_field", "prompt_field", "completion_field", "messages_field")


@dataclass
class Source:
    name: str
    patterns: list[str]
    weight: float | None
    cfg: object  # the DataConfig with this source's format and field names
    key: str  # config key, for messages


def sources_of(dcfg) -> list[Source]:
    """The sources named by data.train (and data.replay), each with its own data settings."""
    out, plain = [], [e for e in dcfg.train if isinstance(e, str)]
    for i, entry in enumerate(dcfg.train):
        if isinstance(entry, SourceConfig):
            own = {f: getattr(entry, f) for f in FIELDS if getattr(entry, f) is not None}
            cfg = dataclasses.replace(dcfg, **own) if own else dcfg
            out.append(Source(entry.name or entry.path[0], list(entry.path), entry.weight, cfg, f"data.train[{i}]"))
        elif entry is plain[0]:  # plain paths together are one source, read as one dataset (one format)
            name = plain[0] if len(plain) == 1 else f"{plain[0]} (+{len(plain) - 1} more)"
            out.append(Source(name, plain, None, dcfg, "data.train"))
    if dcfg.replay:
        out.append(Source("replay", list(dcfg.replay), None, dcfg, "data.replay"))
    names = [s.name for s in out]
    for s in out:  # names label the summary: make them unique
        if names.count(s.name) > 1:
            s.name = f"{s.name} ({s.key})"
    return out


def shares(sources: list[Source], tokens: list[float], replay_weight: float) -> list[float] | None:
    """Each source's share of training tokens, or None when the sources are simply concatenated."""
    replay = bool(sources) and sources[-1].key == "data.replay"
    main = sources[:-1] if replay else sources
    weights = [s.weight for s in main]
    if all(w is None for w in weights):
        if not replay:
            return None
        weights = tokens[: len(main)]  # the new-domain sources keep their natural proportions
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError("config key 'data.train': the source weights sum to 0; give at least one source a weight > 0")
    rest = 1.0 - replay_weight if replay else 1.0
    out = [rest * w / total for w in weights]
    return out + [replay_weight] if replay else out


def check_formats(sets: list[TokenizedSet], sources: list[Source]) -> str:
    """The format of the mixture: plain text and instruction data (chat, prompt_completion) do not mix."""
    kinds = {s.format == "text" for s in sets}
    if len(kinds) > 1:
        text = next(src for src, s in zip(sources, sets) if s.format == "text")
        other = next((src, s) for src, s in zip(sources, sets) if s.format != "text")
        raise ConfigError(f"config key '{text.key}': source {text.name!r} is plain text but {other[0].key} "
                          f"({other[0].name!r}) is {other[1].format} data; mix text with text and instruction data "
                          "with instruction data (run continual pre-training and fine-tuning separately)")
    return next((s.format for s in sets if s.format != "text"), sets[0].format)


def concat(sets: list[TokenizedSet], fmt: str) -> tuple[TokenizedSet, np.ndarray]:
    """One set of all examples, and the source index of each."""
    tokens = np.concatenate([s.tokens for s in sets])
    mask = np.concatenate([s.loss_mask for s in sets])
    lengths = np.concatenate([s.lengths() for s in sets])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    source = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(sets)])
    return TokenizedSet(tokens, mask, offsets, fmt, sum(s.skipped for s in sets),
                        [r for s in sets for r in s.skip_reasons]), source


def token_lengths(data: TokenizedSet, seq_len: int) -> np.ndarray:
    """Tokens each example puts into training rows (instruction examples are truncated to seq_len)."""
    lengths = data.lengths()
    return lengths if data.format == "text" else np.minimum(lengths, seq_len)


def mix(lengths: np.ndarray, source: np.ndarray, share: list[float], total: float, seed: int) -> np.ndarray:
    """Example indices (repeats allowed) holding about share[s]·total tokens of each source s.

    Each source is walked epoch by epoch, a new seeded permutation per epoch.
    """
    picked = []
    for s, w in enumerate(share):
        members = np.flatnonzero(source == s)
        want = w * total
        if want <= 0 or not len(members):
            continue
        have, epoch = 0.0, 0
        while have < want:
            order = members[np.random.default_rng([seed, s, epoch]).permutation(len(members))]
            cum = have + np.cumsum(lengths[order])
            take = int(np.searchsorted(cum, want, side="left")) + 1  # up to the example that reaches the target
            picked.append(order[:take])
            have = float(cum[min(take, len(order)) - 1])
            epoch += 1
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def per_source(lengths: np.ndarray, source: np.ndarray, picked: np.ndarray, sources: list[Source],
               unique: list[float]) -> dict[str, dict]:
    """Per source: examples and tokens in the training rows, share of them, and epochs (its tokens
    over the unique tokens the source holds for training, before any selection)."""
    out = {}
    total = float(lengths[picked].sum()) or 1.0
    for s, src in enumerate(sources):
        mine = picked[source[picked] == s]
        tokens = float(lengths[mine].sum())
        out[src.name] = {"examples": int(len(np.unique(mine))), "tokens": int(tokens), "share": round(tokens / total, 4),
                         "epochs": round(tokens / unique[s], 3) if unique[s] else 0.0}
    return out


def plan_note(cfg, tokens_in_budget: float | None) -> str | None:
    """The planner's per-source view: each source's unique tokens (estimated from file sizes) and the
    epochs of it that its share of the budget's tokens buys. None for a single source."""
    from .sources import estimate_unique_tokens, resolve

    sources = sources_of(cfg.data)
    if len(sources) < 2:
        return None
    unique = []
    for src in sources:
        try:
            resolve(src.patterns, cfg.data.max_files, src.key)
        except Exception:  # planning a config whose data is not on this machine is allowed
            return None
        unique.append(estimate_unique_tokens(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=src.patterns))) or 0.0)
    share = shares(sources, unique, cfg.data.replay_weight) or [u / (sum(unique) or 1.0) for u in unique]
    parts = []
    for src, u, w in zip(sources, unique, share):
        part = f"{src.name} ≈ {u:,.0f} tokens, {100 * w:.0f}%"
        if tokens_in_budget:
            part += f" = {w * tokens_in_budget / u:.2f} epochs" if u else ""
        parts.append(part)
    return "sources (unique tokens estimated from file sizes; share of the training tokens" + \
        (", epochs at the top recipe's tokens in budget" if tokens_in_budget else "") + "): " + "; ".join(parts)
