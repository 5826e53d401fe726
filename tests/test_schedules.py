"""Learning-rate profiles against hand-computed values."""

from __future__ import annotations

import math

import pytest

from budgetune.config import ScheduleConfig
from budgetune.schedules import PROFILES, lr_multiplier, rewarmed


def sched(name: str, **kw) -> ScheduleConfig:
    kw.setdefault("warmup", 0.0)
    return ScheduleConfig(name=name, **kw)


# name, extra config, {p: expected profile value}
EXPECTED = [
    ("constant", {}, {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}),
    ("linear", {}, {0.0: 1.0, 0.25: 0.75, 0.5: 0.5, 1.0: 0.0}),
    ("cosine", {}, {0.0: 1.0, 0.25: 0.5 * (1 + math.sqrt(0.5)), 0.5: 0.5, 0.75: 0.5 * (1 - math.sqrt(0.5)), 1.0: 0.0}),
    # REX: (1 − p) / (0.5 + 0.5 (1 − p))
    ("rex", {}, {0.0: 1.0, 0.5: 0.5 / 0.75, 0.9: 0.1 / 0.55, 1.0: 0.0}),
    # WSD, decay 0.2: flat until 0.8, then linear to 0
    ("wsd", {"decay": 0.2}, {0.0: 1.0, 0.5: 1.0, 0.8: 1.0, 0.85: 0.75, 0.9: 0.5, 1.0: 0.0}),
    ("wsd", {"decay": 0.5}, {0.0: 1.0, 0.5: 1.0, 0.75: 0.5, 1.0: 0.0}),
    ("wsd", {"decay": 0.2, "decay_shape": "sqrt"}, {0.5: 1.0, 0.8: 1.0, 0.85: 1 - math.sqrt(0.25), 0.9: 1 - math.sqrt(0.5), 1.0: 0.0}),
    ("wsd", {"decay": 0.2, "decay_shape": "exp"}, {0.5: 1.0, 0.9: math.exp(-2.5) * 0.5, 1.0: 0.0}),
]


@pytest.mark.parametrize("name, extra, table", EXPECTED, ids=lambda v: v if isinstance(v, str) else None)
def test_profile_values(name, extra, table):
    cfg = sched(name, **extra)
    for p, expected in table.items():
        assert PROFILES[name](p, cfg) == pytest.approx(expected, abs=1e-12), f"{name} at p={p}"
        # without warmup or floor the multiplier is the profile itself
        assert lr_multiplier(p, cfg) == pytest.approx(expected, abs=1e-12), f"lr_multiplier {name} at p={p}"


def test_expected_covers_the_builtin_profiles():
    assert {"constant", "linear", "cosine", "rex", "wsd"} <= set(PROFILES)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_starts_at_one_and_stays_in_range(name):
    cfg = sched(name)
    assert PROFILES[name](0.0, cfg) == pytest.approx(1.0)
    values = [PROFILES[name](i / 100, cfg) for i in range(101)]
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in values)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), "profiles never increase"


@pytest.mark.parametrize("shape", ["linear", "sqrt", "exp"])
def test_wsd_shapes_are_flat_then_decreasing(shape):
    cfg = sched("wsd", decay=0.2, decay_shape=shape)
    assert all(lr_multiplier(i / 100, cfg) == 1.0 for i in range(81))
    tail = [lr_multiplier(0.8 + i / 100, cfg) for i in range(1, 21)]
    assert all(b < a for a, b in zip(tail, tail[1:]))
    assert tail[-1] == pytest.approx(0.0, abs=1e-12)


def test_rex_is_above_linear_in_the_middle():
    cfg = sched("rex")
    for p in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert PROFILES["rex"](p, cfg) > 1 - p


def test_warmup_is_a_linear_ramp():
    cfg = sched("constant", warmup=0.1)
    assert lr_multiplier(0.0, cfg) == 0.0
    assert lr_multiplier(0.025, cfg) == pytest.approx(0.25)
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5)
    assert lr_multiplier(0.1, cfg) == pytest.approx(1.0)
    assert lr_multiplier(0.5, cfg) == pytest.approx(1.0)


def test_warmup_multiplies_the_profile():
    cfg = sched("linear", warmup=0.2)
    assert lr_multiplier(0.1, cfg) == pytest.approx(0.5 * 0.9)
    assert lr_multiplier(0.6, cfg) == pytest.approx(0.4)


def test_min_ratio_floor():
    cfg = sched("cosine", min_ratio=0.1)
    assert lr_multiplier(0.0, cfg) == pytest.approx(1.0)
    assert lr_multiplier(0.5, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.1)
    assert min(lr_multiplier(i / 50, cfg) for i in range(51)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name, extra",
    [("linear", {}), ("cosine", {}), ("rex", {}), ("wsd", {}), ("wsd", {"decay_shape": "sqrt"}), ("wsd", {"decay_shape": "exp"}), ("wsd", {"decay": 1.0})],
)
@pytest.mark.parametrize("min_ratio", [0.0, 0.05, 0.3])
def test_end_of_budget_is_min_ratio(name, extra, min_ratio):
    cfg = sched(name, warmup=0.05, min_ratio=min_ratio, **extra)
    assert lr_multiplier(1.0, cfg) == pytest.approx(min_ratio, abs=1e-12)


def test_progress_is_clamped():
    cfg = sched("cosine", warmup=0.1, min_ratio=0.2)
    assert lr_multiplier(1.7, cfg) == pytest.approx(lr_multiplier(1.0, cfg))
    assert lr_multiplier(-0.3, cfg) == 0.0


def test_an_extended_run_rewarms_from_where_it_stopped():
    # extended at progress 0.3 from LR 1e-5 (annealed), warmup 0.1: a line from 1e-5 to the schedule's LR by 0.4
    assert rewarmed(1e-3, 0.3, 0.3, 1e-5, 0.1) == pytest.approx(1e-5)
    assert rewarmed(1e-3, 0.35, 0.3, 1e-5, 0.1) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert rewarmed(1e-3, 0.4, 0.3, 1e-5, 0.1) == 1e-3
    assert rewarmed(7e-4, 0.9, 0.3, 1e-5, 0.1) == 7e-4  # the schedule alone after the ramp
    assert rewarmed(1e-3, 0.35, 0.3, 1e-3, 0.1) == pytest.approx(1e-3)  # a run that had not annealed goes on at its LR
    assert rewarmed(1e-3, 0.31, 0.3, 1e-5, 0.0) == 1e-3  # schedule.warmup 0: no ramp, as asked
