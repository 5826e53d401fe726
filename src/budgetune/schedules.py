"""Learning-rate profiles as pure functions of budget progress p ∈ [0, 1] (METHODS.md §1).

Because p is measured on the real budget (time, tokens, FLOPs or steps), annealing ends
exactly when the budget does, whatever the throughput turns out to be.
"""

from __future__ import annotations

import math
from typing import Callable

Profile = Callable[[float, object], float]  # (progress, ScheduleConfig) → multiplier
PROFILES: dict[str, Profile] = {}


def register(name: str):
    def wrap(fn: Profile) -> Profile:
        PROFILES[name] = fn
        return fn

    return wrap


@register("constant")
def constant(p: float, cfg) -> float:
    return 1.0


@register("linear")
def linear(p: float, cfg) -> float:
    return 1.0 - p


@register("cosine")
def cosine(p: float, cfg) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


@register("rex")
def rex(p: float, cfg) -> float:
    """Reflected exponential (Chen et al., REX): beats linear at small budgets."""
    return (1.0 - p) / (0.5 + 0.5 * (1.0 - p))


@register("wsd")
def wsd(p: float, cfg) -> float:
    """Warmup-stable-decay (MiniCPM): flat until 1 − decay, then anneal to zero."""
    start = 1.0 - cfg.decay
    if p <= start:
        return 1.0
    q = min(1.0, (p - start) / cfg.decay)
    if cfg.decay_shape == "sqrt":
        return 1.0 - math.sqrt(q)
    if cfg.decay_shape == "exp":
        return math.exp(-5.0 * q) * (1.0 - q)  # exponential, pinned to zero at the end
    return 1.0 - q


def lr_multiplier(p: float, cfg) -> float:
    """η(p)/η_peak = warmup(p) · (min_ratio + (1 − min_ratio) · profile(p))."""
    p = min(1.0, max(0.0, p))
    warmup = min(1.0, p / cfg.warmup) if cfg.warmup > 0 else 1.0
    profile = PROFILES[cfg.name](p, cfg)
    return warmup * (cfg.min_ratio + (1.0 - cfg.min_ratio) * profile)


def rewarmed(lr: float, q: float, start: float, from_lr: float, warmup: float) -> float:
    """The LR of a run extended onto a larger budget (`--resume --extend`, a raced trial promoted to a larger slice,
    the race's winner going on): from the LR it had stopped at, `from_lr`, linearly to the new schedule's `lr` over the
    next `warmup` of budget progress after `start` (the progress where it took up again); the schedule alone after
    that. Without it a run that had annealed jumps from ~0 to near the peak in one step (METHODS.md §2: rewarm, then
    decay)."""
    if warmup <= 0 or q >= start + warmup:
        return lr
    return from_lr + (lr - from_lr) * max(0.0, q - start) / warmup
