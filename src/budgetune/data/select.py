"""Data selection under a budget (METHODS.md §5 and §10): train on the best examples, not a random few.

`data.select: {method, fraction | auto, target}` keeps the share `fraction` of the training
tokens (or, with `auto`, as many tokens as the budget buys, from the planner's estimate) in
the order a method ranks the examples:

- random: a seeded shuffle (the honest baseline).
- length: longest first (tokens that carry a loss).
- loss: highest base-model loss first (what the model does not know yet; also what is noise).
- ifd: instruction-following difficulty, loss(answer | prompt) / loss(answer): high when the
  prompt barely helps. Examples with IFD ≥ 1 (the prompt does not help at all: often a
  wrong or swapped answer) go last, as the IFD paper drops them.
- cdas (CodeACT): k-means (scipy's) on the base model's mean-pooled final hidden states,
  then the highest-IFD examples within each cluster, each cluster kept in proportion.
- rds (RDS+): cosine similarity of position-weighted mean-pooled hidden states to `target`
  examples (default: the held-out split); the most similar first (max over targets).

Scoring with the model runs in batches with a progress bar, inside the run's time budget
(the clock is already running), and is cached by data, model and what was measured. With
weighted sources, every source is selected on its own, keeping its share.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .tokenize import TokenizedSet, content_key, default_cache_dir

METHODS = ("random", "length", "loss", "ifd", "cdas", "rds")
NEEDS_PROMPT = ("ifd", "cdas")  # loss(answer | prompt) needs a prompt
PASSES = {"random": (), "length": (), "loss": ("cond",), "ifd": ("cond", "uncond"), "cdas": ("cond", "uncond", "mean"),
          "rds": ("wmean",)}


@dataclass
class SelectionReport:
    method: str
    fraction: float  # of the training tokens kept
    requested: float | str
    examples_before: int
    examples_kept: int
    tokens_before: int
    tokens_kept: int
    scoring_s: float = 0.0  # time spent scoring (part of the budget)
    cached: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def tokens_in_budget(cfg, prediction: dict | None, flops_per_token: float, elapsed_s: float, world: int = 1) -> float | None:
    """Training tokens the rest of the budget buys, by the planner's estimate; None when it cannot say.

    The tightest of: budget.tokens; budget.steps × tokens per step (full rows assumed);
    budget.flops / FLOPs per token; (budget.time − time used) × the predicted tokens/s.
    """
    from ..budget import Budget

    b = Budget.from_config(cfg.budget)
    options = []
    if b.tokens is not None:
        options.append(b.tokens)
    if b.steps is not None:
        options.append(b.steps * cfg.train.micro_batch * cfg.train.grad_accum * world * cfg.data.seq_len)
    if b.flops is not None and flops_per_token:
        options.append(b.flops / flops_per_token)
    speed = prediction and (prediction.get("measured_tokens_per_s") or prediction.get("tokens_per_s"))  # the probe's, when it ran
    if b.time_s is not None and speed:
        options.append(max(0.0, b.time_s - elapsed_s) * speed)
    return float(min(options)) if options else None


def check_method(method: str, fmt: str) -> None:
    if method in NEEDS_PROMPT and fmt == "text":
        raise ConfigError(f"config key 'data.select.method': {method} scores how much the prompt helps the answer, "
                          f"and data.train is plain text (no prompts); use loss, length, random or rds, "
                          "or train on prompt_completion/chat data")


def answer_mask(data: TokenizedSet, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for s, e in zip(data.offsets[:-1].tolist(), data.offsets[1:].tolist()):
        e = min(e, s + seq_len)
        out.append((data.tokens[s:e], data.loss_mask[s:e]))
    return out


def model_key(model) -> str:
    """A fingerprint of a model's architecture and weights (a sample of each tensor)."""
    import torch

    inner = getattr(model, "module", model)
    h = hashlib.sha256(inner.config.to_json_string().encode())
    with torch.no_grad():
        for name, p in inner.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def score(model, data: TokenizedSet, passes: tuple[str, ...], seq_len: int, batch: int, cache_dir=None,
          log=print, what: str = "training examples") -> tuple[dict[str, np.ndarray], bool]:
    """Per-example measurements with the model, from the cache when it has them; (scores, all cached)."""
    folder = Path(cache_dir or default_cache_dir()) / "scores"
    base = f"{content_key(data)}|{model_key(model)}|{seq_len}"
    out, cached = {}, True
    for p in passes:
        path = folder / (hashlib.sha256(f"score-v1|{base}|{p}".encode()).hexdigest()[:24] + ".npy")
        if path.exists():
            out[p] = np.load(path)
            continue
        cached = False
        out[p] = _measure(model, data, p, seq_len, batch, log, what)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        np.save(tmp, out[p])
        tmp.replace(path)
    return out, cached


def _measure(model, data: TokenizedSet, kind: str, seq_len: int, batch: int, log, what: str) -> np.ndarray:
    """One pass over `data`: 'cond' loss on the answer given the prompt, 'uncond' loss on the
    answer alone, 'mean' / 'wmean' pooled final hidden states (wmean: weights ∝ position)."""
    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    examples = answer_mask(data, seq_len)
    if kind == "uncond":  # the answer tokens alone, as one sequence
        examples = [(ids[m > 0], np.ones(int((m > 0).sum()), np.uint8)) for ids, m in examples]
    order = np.argsort([len(ids) for ids, _ in examples], kind="stable")  # similar lengths share a batch
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    head = inner.get_output_embeddings()
    plain_head = type(head) is torch.nn.Linear
    pooled = kind in ("mean", "wmean")
    result = np.zeros((len(examples), inner.config.hidden_size) if pooled else len(examples), dtype=np.float32)
    was_training = model.training
    model.eval()
    columns = [TextColumn(f"scoring {what} ({kind})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    shown = log is not None and sys.stderr.isatty()  # a bar on a terminal; logs and pipes get the summary line
    try:
        with torch.no_grad(), Progress(*columns, console=Console(stderr=True), transient=True, disable=not shown) as bar:
            task = bar.add_task("", total=len(examples))
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                width = max(2, max(len(examples[i][0]) for i in chunk))
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                attn = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.bool)
                for r, i in enumerate(chunk):
                    t, m = examples[i]
                    ids[r, : len(t)] = torch.from_numpy(t.astype(np.int64))
                    attn[r, : len(t)] = 1
                    mask[r, : len(t)] = torch.from_numpy(m > 0)
                ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
                if plain_head:  # final hidden states out, the head applied to the answer positions only
                    head.forward = lambda x: x
                    try:
                        hidden = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                    finally:
                        del head.forward
                else:
                    out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True)
                    hidden = out.hidden_states[-1]
                if pooled:
                    w = attn.float() * (torch.arange(width, device=device).float() + 1 if kind == "wmean" else 1.0)
                    vec = (hidden.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True)
                    result[chunk] = vec.cpu().numpy()
                else:
                    target = mask[:, 1:]
                    rows, cols = target.nonzero(as_tuple=True)
                    if plain_head:
                        logits = head(hidden[:, :-1][rows, cols])
                    else:
                        logits = out.logits[:, :-1][rows, cols]
                    nll = F.cross_entropy(logits.float(), ids[:, 1:][rows, cols], reduction="none")
                    sums = torch.zeros(len(chunk), device=device).index_add_(0, rows, nll)
                    counts = target.sum(1).clamp(min=1)
                    loss = (sums / counts).cpu().numpy()
                    loss[(target.sum(1) == 0).cpu().numpy()] = np.nan  # nothing to score (e.g. a one-token answer)
                    result[chunk] = loss
                bar.advance(task, len(chunk))
    finally:
        model.train(was_training)
    return result


def _order(method: str, data: TokenizedSet, scores: dict, target_vectors: np.ndarray | None, clusters: int, seed: int,
           idx: np.ndarray) -> np.ndarray:
    """`idx` (examples of one group) from best to worst under `method`."""
    rng = np.random.default_rng(seed)
    if method == "random":
        return idx[rng.permutation(len(idx))]
    if method == "length":
        answer = np.add.reduceat(data.loss_mask.astype(np.int64), data.offsets[:-1]) if len(data.tokens) else np.zeros(0)
        return idx[np.argsort(-answer[idx], kind="stable")]
    if method == "loss":
        return idx[_desc(scores["cond"][idx])]
    if method == "ifd":
        return idx[_desc(_ifd(scores)[idx])]
    if method == "cdas":
        return _cdas(scores, clusters, seed, idx)
    if method == "rds":
        vec = _unit(scores["wmean"][idx])
        sim = (vec @ _unit(target_vectors).T).max(1)
        return idx[_desc(sim)]
    raise ValueError(method)


def _desc(values: np.ndarray) -> np.ndarray:
    """Indices from highest to lowest; NaN last."""
    v = np.where(np.isnan(values), -np.inf, values)
    return np.argsort(-v, kind="stable")


def _ifd(scores: dict) -> np.ndarray:
    ifd = scores["cond"] / np.maximum(scores["uncond"], 1e-6)
    return np.where(ifd >= 1.0, -ifd, ifd)  # IFD ≥ 1: the prompt does not help; ranked after every other example


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _cdas(scores: dict, clusters: int, seed: int, idx: np.ndarray) -> np.ndarray:
    """Interleave clusters: each cluster's examples by IFD, clusters drawn in proportion to their size."""
    from scipy.cluster.vq import kmeans2

    k = clusters or max(1, int(round(np.sqrt(len(idx) / 2))))
    k = min(k, len(idx))
    vec = _unit(scores["mean"][idx].astype(np.float64))
    _, labels = kmeans2(vec, k, seed=seed, minit="++")
    ifd = _ifd(scores)[idx]
    # rank within cluster r/size: the best of every cluster first, so any prefix keeps each cluster's share
    rank = np.zeros(len(idx))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranked = members[_desc(ifd[members])]
        rank[ranked] = (np.arange(len(ranked)) + 0.5) / len(ranked)
    return idx[np.argsort(rank, kind="stable")]


def select(data: TokenizedSet, source: np.ndarray, shares: list[float] | None, scfg, seq_len: int, *, model=None,
           target: TokenizedSet | None = None, budget_tokens=None, seed: int = 0, cache_dir=None, log=print
           ) -> tuple[np.ndarray, SelectionReport]:
    """Indices of the examples kept (ascending), and what was done."""
    from .mixture import token_lengths

    method = scfg.method
    check_method(method, data.format)
    started = time.monotonic()
    passes = PASSES[method]
    scores, cached, target_vectors = {}, True, None
    if passes:
        if model is None:
            raise ConfigError(f"config key 'data.select.method': {method} scores examples with the model; "
                              "it runs inside `budgetune train`")
        scores, cached = score(model, data, passes, seq_len, scfg.batch, cache_dir, log)
        if method == "rds":
            if target is None or not len(target):
                raise ConfigError("config key 'data.select.target': rds needs target examples; name a file of them, "
                                  "or keep a held-out split (data.eval_fraction > 0)")
            tscores, tcached = score(model, target, ("wmean",), seq_len, scfg.batch, cache_dir, log, what="target examples")
            target_vectors, cached = tscores["wmean"], cached and tcached
    scoring_s = time.monotonic() - started
    lengths = token_lengths(data, seq_len)
    total = float(lengths.sum())
    groups = range(len(shares)) if shares is not None else [None]
    notes = []
    if scfg.fraction == "auto":
        bought = budget_tokens() if budget_tokens is not None else None
        if bought is None:
            raise ConfigError("config key 'data.select.fraction': 'auto' needs a budget the planner can turn into tokens "
                              "(budget.tokens, budget.steps, budget.flops, or budget.time with a planned recipe); give a number")
        notes.append(f"the budget buys about {bought:,.0f} tokens (planner estimate)")
    kept = []
    for g in groups:
        idx = np.arange(len(data)) if g is None else np.flatnonzero(source == g)
        if not len(idx):
            continue
        group_tokens = float(lengths[idx].sum())
        if scfg.fraction == "auto":
            want = bought * (1.0 if g is None else shares[g])
        else:
            want = scfg.fraction * group_tokens
        ranked = _order(method, data, scores, target_vectors, scfg.clusters, seed, idx)
        cum = np.cumsum(lengths[ranked])
        take = max(1, min(len(ranked), int(np.searchsorted(cum, want, side="left")) + 1))
        if cum[take - 1] > want and take > 1 and cum[take - 2] >= 0.999 * want:
            take -= 1
        kept.append(ranked[:take])
    keep = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    kept_tokens = float(lengths[keep].sum())
    report = SelectionReport(method, kept_tokens / total if total else 0.0, scfg.fraction, len(data), len(keep), int(total),
                             int(kept_tokens), scoring_s, cached and bool(passes), notes)
    if log:
        log(f"data.select {method}: kept {len(keep)} of {len(data)} examples ({100 * report.fraction:.0f}% of the tokens"
            + (f", {notes[0]}" if notes else "") + ")"
            + (f"; scoring took {scoring_s:.1f}s of the budget" + (" (from cache)" if report.cached else "") if passes else ""))
    return keep, report
