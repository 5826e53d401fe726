"""Budgets and the clock that turns them into progress p ∈ [0, 1].

Whichever budget runs out first governs. A time budget covers the whole `train` command
after model load: data preparation, training, periodic evals and checkpoints, and the
final eval and save. Training therefore stops early by a *reserve* — the measured cost of
the final eval + save — so the command as a whole ends on time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .units import parse_count, parse_duration


@dataclass(frozen=True)
class Budget:
    time_s: float | None = None
    tokens: float | None = None
    steps: int | None = None
    flops: float | None = None
    reserve_s: float | None = None  # fixed reserve; None = estimate from measurements

    @classmethod
    def from_config(cls, cfg) -> "Budget":
        return cls(
            time_s=parse_duration(cfg.time) if cfg.time is not None else None,
            tokens=parse_count(cfg.tokens) if cfg.tokens is not None else None,
            steps=cfg.steps,
            flops=parse_count(cfg.flops) if cfg.flops is not None else None,
            reserve_s=parse_duration(cfg.reserve) if cfg.reserve is not None else None,
        )

    def describe(self) -> str:
        from .units import format_count, format_duration

        parts = []
        if self.time_s is not None:
            parts.append(f"time {format_duration(self.time_s)}")
        if self.tokens is not None:
            parts.append(f"tokens {format_count(self.tokens)}")
        if self.steps is not None:
            parts.append(f"steps {self.steps}")
        if self.flops is not None:
            parts.append(f"FLOPs {self.flops:.3g}")
        return ", ".join(parts)


# Periodic evals and checkpoints are priced into the budget ("auto" cadence): a 150 s run does not
# need three evals and a checkpoint, a 10-hour run does.
AUTO_EVAL_SHARE = 0.02  # periodic evals may cost at most this share of a time budget
AUTO_EVAL_MAX = 9  # and there are at most this many (every 10% of the budget)
AUTO_EVAL_UNTIMED = 3  # tokens/steps/FLOPs budgets: evals cost no budget, so every 25%
AUTO_CHECKPOINT_S = 600.0  # a checkpoint every 10 minutes of wall-clock: a kill loses ≤ 10 minutes; runs shorter get none


def auto_eval_interval(budget: Budget, eval_cost_s: float) -> tuple[str, float] | None:
    """('progress', f) for `eval.every: auto`, or None when no periodic eval is worth its cost.

    With a time budget, n periodic evals cost n × eval_cost_s of training time; n is the largest
    count within AUTO_EVAL_SHARE of the budget (at most AUTO_EVAL_MAX), spaced evenly."""
    if budget.time_s is None:
        n = AUTO_EVAL_UNTIMED
    else:
        n = min(AUTO_EVAL_MAX, int(AUTO_EVAL_SHARE * budget.time_s / max(eval_cost_s, 1e-3)))
    return ("progress", 1.0 / (n + 1)) if n > 0 else None


class Every:
    """A periodic trigger measured in budget progress or in seconds; `auto` is what an
    `interval: auto` resolves to (auto_eval_interval / auto_checkpoint_interval)."""

    def __init__(self, interval, start_p: float = 0.0, start_s: float = 0.0, auto: tuple[str, float] | None = None):
        from .config import parse_interval

        parsed = parse_interval(interval)
        self.kind, self.value = (auto if parsed and parsed[0] == "auto" else parsed) or (None, 0.0)
        self.last = start_p if self.kind == "progress" else start_s

    def due(self, p: float, elapsed: float) -> bool:
        now = p if self.kind == "progress" else elapsed
        if self.kind is None or now - self.last < self.value - 1e-9:
            return False
        self.last = now
        return True


def auto_checkpoint_interval() -> tuple[str, float]:
    """('seconds', s) for `checkpoint.every: auto`."""
    return ("seconds", AUTO_CHECKPOINT_S)


class BudgetClock:
    """Tracks consumption of a Budget and reports progress.

    `spent_s` carries time consumed by earlier attempts of the same run (resume), so a
    resumed run gets only what is left of its time budget.
    """

    def __init__(self, budget: Budget, flops_per_token: float = 0.0, spent_s: float = 0.0, clock=time.monotonic):
        self.budget = budget
        self.flops_per_token = flops_per_token
        self._clock = clock
        self._started = clock()
        self._spent_before = spent_s
        self.tokens = 0.0
        self.steps = 0
        self.reserve_s = budget.reserve_s if budget.reserve_s is not None else 0.0
        self._fixed_reserve = budget.reserve_s is not None
        self.step_seconds = 0.0  # running estimate of one optimizer step's duration
        self._max_p = 0.0
        self._max_q = 0.0
        self.train_start_s: float | None = None  # budget seconds used when the first optimizer step began

    # --- consumption -------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of this run's budget used so far (across resumes)."""
        return self._spent_before + self._clock() - self._started

    def record_step(self, tokens: float, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        # exponential moving average, but follow slow-downs quickly (periodic evals are excluded by the caller)
        self.step_seconds = seconds if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * seconds

    def set_reserve(self, seconds: float) -> None:
        if not self._fixed_reserve:
            self.reserve_s = seconds

    def start_training(self) -> None:
        """Mark the first optimizer step. The LR schedule (warmup included) runs from here: time spent
        on data preparation and the first eval is budget used, but not schedule progress."""
        if self.train_start_s is None:
            self.train_start_s = self.elapsed()

    # --- progress ----------------------------------------------------------------------
    def fractions(self, from_training: bool = False) -> dict[str, float]:
        """Progress of each budget that is set, before taking the maximum. `from_training`: the time
        budget's share counted from the first optimizer step (what the schedule follows)."""
        b = self.budget
        out = {}
        if b.time_s is not None:
            t0 = (self.train_start_s or 0.0) if from_training else 0.0
            window = max(1e-9, b.time_s - self.reserve_s - t0)
            out["time"] = max(0.0, self.elapsed() - t0) / window
        if b.tokens is not None:
            out["tokens"] = self.tokens / b.tokens
        if b.steps is not None:
            out["steps"] = self.steps / b.steps
        if b.flops is not None and self.flops_per_token > 0:
            out["flops"] = self.tokens * self.flops_per_token / b.flops
        return out

    def governing(self) -> str:
        fractions = self.fractions()
        return max(fractions, key=fractions.get) if fractions else "none"

    def progress(self) -> float:
        """p ∈ [0, 1]; never decreases (a shrinking reserve must not rewind the schedule)."""
        fractions = self.fractions()
        p = min(1.0, max(fractions.values())) if fractions else 0.0
        self._max_p = max(self._max_p, p)
        return self._max_p

    def schedule_progress(self) -> float:
        """q ∈ [0, 1]: the progress the LR schedule follows — like progress(), but a time budget's share
        is counted from the first optimizer step, so warmup starts at step 1 and annealing still ends
        with the budget. Never decreases."""
        fractions = self.fractions(from_training=True)
        q = min(1.0, max(fractions.values())) if fractions else 0.0
        self._max_q = max(self._max_q, q)
        return self._max_q

    def should_stop(self) -> bool:
        """True when the next optimizer step would end further past the budget than stopping now."""
        if self.progress() >= 1.0:
            return True
        b = self.budget
        if b.time_s is not None and self.step_seconds > 0:
            # stop if finishing one more step would overshoot by more than stopping now undershoots
            window = b.time_s - self.reserve_s
            if self.elapsed() + 0.5 * self.step_seconds >= window:
                return True
        return False

    def training_time_left(self) -> float | None:
        """Seconds until training stops for the final eval + save (the budget less the reserve)."""
        if self.budget.time_s is None:
            return None
        return max(0.0, self.budget.time_s - self.reserve_s - self.elapsed())

    def time_left(self) -> float | None:
        if self.budget.time_s is None:
            return None
        return max(0.0, self.budget.time_s - self.elapsed())

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed(), "tokens": self.tokens, "steps": self.steps, "max_p": self._max_p,
                "train_start_s": self.train_start_s}

    def load_state_dict(self, state: dict) -> None:
        self._spent_before = state["elapsed_s"]
        self._started = self._clock()
        self.tokens = state["tokens"]
        self.steps = state["steps"]
        self.train_start_s = state.get("train_start_s")
        # max_p is not restored: a resumed run may carry a larger budget (continue a WSD
        # run from its stable phase), and its progress must be measured against that
