"""Scaling laws for pre-training from scratch (METHODS.md §2).

- Chinchilla: compute-optimal D ≈ 20 N, C ≈ 6 N D  ⇒  N ≈ sqrt(C / 120).
- Data-constrained (Muennighoff et al.): U unique tokens seen for R repetitions are worth
  D' = U + U · R* · (1 − exp(−R / R*)) fresh tokens, R* ≈ 15.4. When the corpus is small,
  the optimum shifts to a larger model trained on fewer (repeated) tokens.
- Step Law (Predictable Scale): η_opt = 1.79 · N^−0.713 · D^0.307, B_opt = 0.58 · D^0.571
  (N non-embedding parameters, D tokens, B in tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

R_STAR = 15.4
TOKENS_PER_PARAM = 20.0


def chinchilla(flops: float) -> tuple[float, float]:
    """(N, D) compute-optimal for a training budget of `flops` (C = 6 N D, D = 20 N)."""
    n = math.sqrt(flops / (6.0 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def effective_tokens(unique: float, total: float) -> float:
    """Fresh-data equivalent of training `total` tokens drawn from `unique` unique tokens."""
    if total <= unique:
        return total
    repeats = total / unique - 1.0
    return unique + unique * R_STAR * (1.0 - math.exp(-repeats / R_STAR))


STEP_LAW_BATCH = (0.58, 0.571)  # B = a · D^b (tokens)
# Step Law's LR extrapolated to models far below the sizes it was fitted on (hundreds of millions of
# parameters and up) overshoots: for llama-tiny (N ≈ 1.8M) it gives ~5.6e-3, and at equal wall-clock
# 1.4e-3 beat it by 0.55–0.82 nats on two corpora (and 3e-4 was 0.37 worse than 1.4e-3) — docs/benchmarks.md
# "The race". So below SMALL_MODEL the LR is capped: a measured ceiling, not a law.
STEP_LAW_MAX_LR = 1.5e-3
SMALL_MODEL = 50e6  # non-embedding parameters


def step_law(n_params: float, tokens: float) -> tuple[float, float]:
    """(peak learning rate, batch size in tokens) from Step Law, as published."""
    a, b = STEP_LAW_BATCH
    return 1.79 * n_params**-0.713 * tokens**0.307, a * tokens**b


def scratch_lr(n_params: float, tokens: float) -> float:
    """The peak LR the planner uses from scratch: Step Law's, at most STEP_LAW_MAX_LR for models below SMALL_MODEL."""
    lr = step_law(n_params, tokens)[0]
    return min(lr, STEP_LAW_MAX_LR) if n_params < SMALL_MODEL else lr


@dataclass
class ScratchProposal:
    params: float  # non-embedding parameters
    tokens: float  # training tokens
    epochs: float
    effective_tokens: float
    lr: float
    batch_tokens: float
    reasoning: list[str]


def propose_scratch(flops: float, unique_tokens: float | None = None) -> ScratchProposal:
    """Model size and token count for a FLOPs budget, corrected for a small corpus.

    With enough data this is Chinchilla. When Chinchilla's D exceeds the unique tokens,
    search N (on a log grid) for the lowest loss proxy under the data-constrained law:
    minimise the Chinchilla-form loss A/N^α + B/D'^β with D' the effective tokens.
    """
    n, d = chinchilla(flops)
    why = [f"compute budget C = {flops:.3g} FLOPs; Chinchilla (C = 6ND, D = 20N) → N = {n:.3g}, D = {d:.3g} tokens"]
    if unique_tokens and d > unique_tokens:
        # Chinchilla fit (Hoffmann et al.): L = E + A/N^0.34 + B/D^0.28
        def loss(n_: float) -> float:
            d_ = flops / (6.0 * n_)
            return 406.4 / n_**0.34 + 410.7 / effective_tokens(unique_tokens, d_) ** 0.28

        grid = [n * 2 ** (k / 8) for k in range(-24, 41)]
        best = min(grid, key=loss)
        why.append(
            f"the corpus has only {unique_tokens:.3g} unique tokens (< D): repeated data is worth less "
            f"(D' = U + U·R*(1 − e^(−R/R*)), R* = {R_STAR}); the data-constrained optimum is N = {best:.3g}"
        )
        n, d = best, flops / (6.0 * best)
    epochs = d / unique_tokens if unique_tokens else 1.0
    eff = effective_tokens(unique_tokens, d) if unique_tokens else d
    law_lr, batch = step_law(n, d)
    lr = scratch_lr(n, d)
    capped = f", capped at {STEP_LAW_MAX_LR:.3g} (measured: the law overshoots on models this small) → {lr:.3g}" if lr < law_lr else ""
    why.append(f"Step Law: peak LR = 1.79·N^−0.713·D^0.307 = {law_lr:.3g}{capped}; batch = 0.58·D^0.571 = {batch:.3g} tokens")
    if unique_tokens:
        why.append(f"{epochs:.2f} epochs over the data ({'nearly as good as fresh data' if epochs <= 4 else 'returns fall beyond ~4 epochs'})")
    return ScratchProposal(n, d, epochs, eff, lr, batch, why)


def scratch_architecture(n_params: float, vocab_size: int) -> dict:
    """A Llama shape with about n_params non-embedding parameters (depth/width ratio ~ 1:64..1:128)."""
    best = None
    for layers in (2, 4, 6, 8, 12, 16, 20, 24, 32):
        for hidden in (64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096):
            if not 32 <= hidden / layers <= 192:
                continue
            inter = int(round(hidden * 8 / 3 / 64)) * 64
            n = layers * (4 * hidden * hidden + 3 * hidden * inter)
            score = abs(math.log(n / n_params))
            if best is None or score < best[0]:
                heads = max(1, hidden // 64)
                best = (score, dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size), n)
    return best[1]
