"""Tokens per optimizer step, and the learning rate to go with them, for the model at the end of the budget.

A fixed budget buys D tokens. Spending them in fewer, larger steps only pays while the batch is
below the critical batch size; at small budgets more, smaller steps give a lower loss. So the
planner chooses the batch from D, not from throughput:

- pre-training from scratch: Step Law (Li et al., "Predictable Scale", METHODS.md §2) —
  B = 0.58 · D^0.571 tokens and η = 1.79 · N^−0.713 · D^0.307 (N non-embedding parameters), η at
  most 1.5e-3 below 50M parameters (scaling.STEP_LAW_MAX_LR: extrapolated to models that small, the
  law overshoots ~4×);
- fine-tuning a pretrained model: B = 0.19 · D^0.571 (FINETUNE_BATCH) — Step Law's exponent with a
  constant a third of its own, measured: at equal wall-clock (150 s, ~1M tokens, two seeds) on
  data nobody tuned for, 512 tokens per step beat Step Law's ~1.5k by 0.16–0.25 nats (full FT) and
  0.04 (LoRA r16), and 4,096 lost by 0.5 (`benchmarks/race.py --sweep train.batch_tokens=…`,
  docs/benchmarks.md "The race"). The exponent is Step Law's, not fitted (one budget was swept).
  The learning rate is the configured one (`optim.lr`), since Step Law's LR fit is for
  training from scratch; `budgetune tune` races the LR.

An adapter method (LoRA and the other peft-style methods) trains at ADAPTER_LR_SCALE × that LR
when `optim.lr` is left open: a low-rank update needs a larger step than full fine-tuning
("LoRA Without Regret", Schulman et al. 2025, puts LoRA's best LR at ~10× full fine-tuning's best).
Measured (docs/benchmarks.md "The race", LR per method): 4× was 0.16–0.18 lower than 1× on the race's
LoRA (150 s, two seeds) and 0.05 on SmolLM2-135M, where 10× was level with 4×; 4× keeps a 3e-4 base
within the LRs LoRA is run at on large models.

Keys the user pinned (`train.batch_tokens`, `train.micro_batch` + `train.grad_accum`, `optim.lr`)
are never changed. A batch in tokens counts real tokens: packed rows hold data.seq_len of them,
unpacked rows (data.pack: false) the data's mean row length, so short examples give more rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scaling import STEP_LAW_BATCH, STEP_LAW_MAX_LR, scratch_lr, step_law

FINETUNE_BATCH = (0.19, 0.571)  # fine-tuning: a third of Step Law's constant, from the batch sweeps in docs/benchmarks.md
ADAPTER_LR_SCALE = 4.0  # an adapter method's LR relative to full fine-tuning's, when optim.lr is open (measured)
MIN_BATCH_TOKENS = 256  # below this a step's gradient is mostly noise, whatever the budget
TIME_OVERHEAD = 0.9  # share of a time budget expected to go to optimizer steps (data, evals, saves take the rest)


@dataclass
class BatchChoice:
    batch_tokens: int  # the target (the rule's output, before rounding to whole rows)
    rows_per_step: int  # rows per optimizer step, all processes together
    tokens_in_budget: float  # D: what the rule was given
    basis: str  # where D came from ("budget.tokens", "time × predicted tokens/s", ...)
    rule: str  # which rule, with its numbers
    lr: float | None = None  # a learning rate to go with it; None = keep optim.lr
    lr_step_law: float | None = None  # Step Law's LR before the cap (when `lr` came from it)
    tokens_per_row: float | None = None  # unpacked rows: the data's mean real tokens per row (None: full rows of seq_len)

    def describe(self, seq_len: int) -> str:
        """One line for `plan` and the train log."""
        if self.tokens_per_row is None:
            shape = f"{_short(self.rows_per_step * seq_len)} tokens/step ({self.rows_per_step} × {seq_len})"
        else:
            shape = (f"~{_short(self.rows_per_step * self.tokens_per_row)} tokens/step ({self.rows_per_step} unpacked rows "
                     f"× {self.tokens_per_row:.0f} real tokens on average, of up to {seq_len})")
        text = (f"batch {shape} because the budget buys ~{_short(self.tokens_in_budget)} tokens ({self.basis}); {self.rule}")
        if self.lr is not None:
            law = f"Step Law: 1.79·N^−0.713·D^0.307"
            if self.lr_step_law is not None and self.lr < self.lr_step_law:
                law += f" = {self.lr_step_law:.3g}, capped at {STEP_LAW_MAX_LR:.3g}"
            text += f"; peak LR {self.lr:.3g} ({law})"
        return text


def _short(n: float) -> str:
    """Three significant figures with a k/M/G suffix: 1.02k, 540k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def batch_tokens_for(tokens: float, scratch: bool) -> float:
    """The rule: tokens per optimizer step for a budget of `tokens` training tokens."""
    a, b = STEP_LAW_BATCH if scratch else FINETUNE_BATCH
    return max(float(MIN_BATCH_TOKENS), a * tokens**b)


def tokens_the_budget_buys(budget, tokens_per_s: float | None, flops_per_token: float) -> tuple[float, str] | None:
    """(D, basis): the training tokens a budget buys — the smallest over the budgets that are set;
    None when only a step budget is set (then the batch decides D, not the other way round)."""
    options = []
    if budget.tokens is not None:
        options.append((float(budget.tokens), "budget.tokens"))
    if budget.flops is not None and flops_per_token > 0:
        options.append((budget.flops / flops_per_token, "budget.flops ÷ FLOPs per token"))
    if budget.time_s is not None and tokens_per_s:
        options.append((TIME_OVERHEAD * budget.time_s * tokens_per_s,
                        f"{TIME_OVERHEAD:.0%} of {budget.time_s:.0f} s at ~{tokens_per_s:,.0f} tokens/s predicted"))
    return min(options) if options else None


def choose_batch(budget, tokens_per_s: float | None, flops_per_token: float, seq_len: int, world: int, scratch: bool,
                 non_embedding_params: float | None = None, choose_lr: bool = False,
                 tokens_per_row: float | None = None) -> BatchChoice | None:
    """The batch (and, from scratch with the LR open, the LR) for this budget; None if the budget gives no D.
    `tokens_per_row`: real tokens per unpacked row on average (None: full rows of seq_len)."""
    bought = tokens_the_budget_buys(budget, tokens_per_s, flops_per_token)
    if bought is None:
        return None
    tokens, basis = bought
    target = batch_tokens_for(tokens, scratch)
    rows = rows_from_batch_tokens(target, tokens_per_row or seq_len, world)
    a, b = STEP_LAW_BATCH if scratch else FINETUNE_BATCH
    rule = (f"Step Law B = {a}·D^{b}" if scratch else f"fine-tuning rule B = {a}·D^{b}") + f" = {target:,.0f}"
    lr = law_lr = None
    if scratch and choose_lr and non_embedding_params:
        lr, law_lr = scratch_lr(non_embedding_params, tokens), step_law(non_embedding_params, tokens)[0]
    return BatchChoice(int(target), rows, tokens, basis, rule, lr, law_lr, tokens_per_row)


def rows_from_batch_tokens(batch_tokens: float, tokens_per_row: float, world: int) -> int:
    """Rows per step (all processes) for a batch in tokens: whole rows per process, at least one each.
    `tokens_per_row`: data.seq_len for packed rows, the data's mean real row length for unpacked ones."""
    return max(world, int(round(batch_tokens / (tokens_per_row * world))) * world)


def method_lr_scale(method: str) -> float:
    """The factor on the base LR (optim.lr, or Step Law's from scratch) for `method` when optim.lr is open."""
    from ..methods import METHODS

    return ADAPTER_LR_SCALE if METHODS[method].adapter else 1.0
