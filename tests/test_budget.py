"""Units parsing/formatting and the BudgetClock (driven by a fake clock)."""

from __future__ import annotations

import pytest

from budgetune.budget import Budget, BudgetClock
from budgetune.config import BudgetConfig
from budgetune.units import describe_bytes, format_count, format_duration, parse_bytes, parse_count, parse_duration


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("90 sec", 90.0),
        ("1.5m", 90.0),
        ("2min", 120.0),
        ("2h", 7200.0),
        ("1hr", 3600.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        (".5m", 30.0),
        ("1e2s", 100.0),
        ("  10M ", 600.0),  # units are case-insensitive
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "abc", "5 minutes", "5x", True])  # "-5s" parses (the config says > 0); "1h30m" is 90 min
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "value, count",
    [
        ("1000", 1000.0),
        ("5M", 5e6),
        ("5m", 5e6),
        ("1.5e9", 1.5e9),
        ("2B", 2e9),
        ("7G", 7e9),
        ("3k", 3000.0),
        ("1T", 1e12),
        ("0.5k", 500.0),
        (42, 42.0),
    ],
)
def test_parse_count(value, count):
    assert parse_count(value) == pytest.approx(count)


@pytest.mark.parametrize("value", ["", "five", "5MB", "-3", "1,000", False])
def test_parse_count_rejects(value):
    with pytest.raises(ValueError):
        parse_count(value)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0.0s"), (-5, "0.0s"), (12.34, "12.3s"), (59.9, "59.9s"), (60, "1m00s"), (90, "1m30s"), (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"), (90000, "25h00m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1500, "1.50k"), (2.5e6, "2.50M"), (3e9, "3.00B"), (1e12, "1.00T"), (-2000, "-2.00k")])
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.parametrize(
    "value, n",
    [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24 gib", 24 * 2**30), ("1TB", 10**12), ("1TiB", 2**40),
     ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), ("2e9", 2e9), (4096, 4096)],
)
def test_parse_bytes_keeps_si_and_binary_units_apart(value, n):
    assert parse_bytes(value) == n


@pytest.mark.parametrize("value", ["24 G", "24GBs", "lots", "-1GB", "24 GiGB"])
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError):
        parse_bytes(value)


def test_describe_bytes_says_both_readings():
    assert describe_bytes(24 * 2**30) == "24.00 GiB = 25.77 GB"
    assert describe_bytes(24 * 10**9) == "22.35 GiB = 24.00 GB"
    assert describe_bytes(2**40) == "1.00 TiB = 1.10 TB"


def test_budget_from_config_and_describe():
    b = Budget.from_config(BudgetConfig(time="2m", tokens="5M", steps=3, flops="1e15", reserve="10s"))
    assert b == Budget(time_s=120.0, tokens=5e6, steps=3, flops=1e15, reserve_s=10.0)
    assert b.describe() == "time 2m00s, tokens 5.00M, steps 3, FLOPs 1e+15"
    empty = Budget.from_config(BudgetConfig(steps=7))
    assert empty == Budget(steps=7) and empty.describe() == "steps 7"


# --------------------------------------------------------------------------- progress


def make(budget: Budget, **kw) -> tuple[BudgetClock, FakeClock]:
    clock = FakeClock()
    return BudgetClock(budget, clock=clock, **kw), clock


def test_time_progress():
    bc, clock = make(Budget(time_s=100.0, reserve_s=0.0))
    assert bc.progress() == 0.0
    clock.advance(25)
    assert bc.elapsed() == pytest.approx(25)
    assert bc.progress() == pytest.approx(0.25)
    assert bc.governing() == "time"
    assert bc.time_left() == pytest.approx(75)
    clock.advance(200)
    assert bc.progress() == 1.0  # capped
    assert bc.time_left() == 0.0


def test_tokens_progress():
    bc, _ = make(Budget(tokens=1000))
    bc.record_step(250, 1.0)
    assert bc.progress() == pytest.approx(0.25)
    bc.record_step(250, 1.0)
    assert bc.progress() == pytest.approx(0.5)
    assert bc.tokens == 500 and bc.steps == 2
    assert bc.governing() == "tokens"
    assert bc.time_left() is None


def test_steps_progress():
    bc, _ = make(Budget(steps=4))
    for expected in (0.25, 0.5, 0.75, 1.0):
        bc.record_step(10, 0.1)
        assert bc.progress() == pytest.approx(expected)
    assert bc.should_stop()


def test_flops_progress():
    bc, _ = make(Budget(flops=1e6), flops_per_token=1000.0)
    bc.record_step(250, 1.0)
    assert bc.fractions() == {"flops": pytest.approx(0.25)}
    assert bc.progress() == pytest.approx(0.25)


def test_flops_budget_ignored_without_flops_per_token():
    bc, _ = make(Budget(flops=1e6))
    bc.record_step(10**9, 1.0)
    assert bc.fractions() == {}
    assert bc.progress() == 0.0
    assert bc.governing() == "none"


def test_governing_budget_is_the_max():
    bc, clock = make(Budget(time_s=100.0, tokens=1000, steps=10, reserve_s=0.0))
    clock.advance(50)
    bc.record_step(100, 1.0)
    assert bc.fractions() == {"time": pytest.approx(0.5), "tokens": pytest.approx(0.1), "steps": pytest.approx(0.1)}
    assert bc.governing() == "time" and bc.progress() == pytest.approx(0.5)
    bc.record_step(600, 1.0)  # tokens 700/1000
    assert bc.governing() == "tokens" and bc.progress() == pytest.approx(0.7)
    for _ in range(7):
        bc.record_step(0, 1.0)  # steps 9/10
    assert bc.governing() == "steps" and bc.progress() == pytest.approx(0.9)


def test_reserve_shortens_the_time_window():
    bc, clock = make(Budget(time_s=100.0))
    assert bc.reserve_s == 0.0
    bc.set_reserve(20.0)
    clock.advance(40)
    assert bc.progress() == pytest.approx(40 / 80)


def test_fixed_reserve_is_not_overridden():
    bc, clock = make(Budget(time_s=100.0, reserve_s=10.0))
    bc.set_reserve(50.0)
    assert bc.reserve_s == 10.0
    clock.advance(45)
    assert bc.progress() == pytest.approx(0.5)


def test_reserve_larger_than_budget_means_done():
    bc, clock = make(Budget(time_s=10.0, reserve_s=30.0))
    clock.advance(0.001)
    assert bc.progress() == 1.0
    assert bc.should_stop()


def test_progress_monotone_when_reserve_shrinks():
    bc, clock = make(Budget(time_s=100.0))
    bc.set_reserve(50.0)
    clock.advance(40)
    assert bc.progress() == pytest.approx(0.8)
    bc.set_reserve(0.0)  # raw time fraction drops to 0.4
    assert bc.fractions()["time"] == pytest.approx(0.4)
    assert bc.progress() == pytest.approx(0.8)
    clock.advance(50)  # 90 / 100
    assert bc.progress() == pytest.approx(0.9)


def test_step_seconds_moving_average():
    bc, _ = make(Budget(steps=100))
    bc.record_step(1, 10.0)
    assert bc.step_seconds == 10.0
    bc.record_step(1, 20.0)
    assert bc.step_seconds == pytest.approx(12.0)


# --------------------------------------------------------------------------- stopping


def test_should_stop_half_step_rule():
    bc, clock = make(Budget(time_s=100.0, reserve_s=0.0))
    bc.record_step(1, 10.0)  # one step takes 10 s
    clock.advance(94)
    assert not bc.should_stop()  # 94 + 5 < 100: one more step overshoots less than stopping undershoots
    clock.advance(1)
    assert bc.should_stop()  # 95 + 5 >= 100


def test_should_stop_half_step_rule_uses_reserve():
    bc, clock = make(Budget(time_s=100.0))
    bc.set_reserve(20.0)
    bc.record_step(1, 4.0)
    clock.advance(77.9)
    assert not bc.should_stop()  # 77.9 + 2 < 80
    clock.advance(0.2)
    assert bc.should_stop()  # 78.1 + 2 >= 80


def test_should_stop_without_step_estimate_waits_for_budget():
    bc, clock = make(Budget(time_s=100.0, reserve_s=0.0))
    clock.advance(99.5)
    assert not bc.should_stop()
    clock.advance(0.5)
    assert bc.should_stop()


def test_should_stop_on_tokens():
    bc, _ = make(Budget(tokens=100, time_s=1e6))
    bc.record_step(99, 0.01)
    assert not bc.should_stop()
    bc.record_step(1, 0.01)
    assert bc.should_stop()


# --------------------------------------------------------------------------- resume


def test_state_dict_carries_elapsed_time_across_resume():
    budget = Budget(time_s=100.0, tokens=10_000, reserve_s=0.0)
    first, clock1 = make(budget)
    clock1.advance(30)
    first.record_step(500, 15.0)
    first.record_step(500, 15.0)
    state = first.state_dict()
    assert state == {"elapsed_s": pytest.approx(30.0), "tokens": 1000, "steps": 2, "max_p": 0.0, "train_start_s": None}
    assert first.progress() == pytest.approx(0.3)
    state = first.state_dict()
    assert state["max_p"] == pytest.approx(0.3)

    clock2 = FakeClock(t=5_000_000.0)  # a new process: unrelated monotonic origin
    resumed = BudgetClock(budget, clock=clock2)
    resumed.load_state_dict(state)
    assert resumed.elapsed() == pytest.approx(30.0)
    assert resumed.tokens == 1000 and resumed.steps == 2
    assert resumed.progress() == pytest.approx(0.3)
    clock2.advance(10)
    assert resumed.elapsed() == pytest.approx(40.0)
    assert resumed.progress() == pytest.approx(0.4)
    assert resumed.time_left() == pytest.approx(60.0)


def test_resume_with_larger_budget_measures_against_it():
    """A resumed run may carry a larger budget (continue a WSD run from its stable phase):
    progress is recomputed against the new budget, not pinned to the saved maximum."""
    first, clock1 = make(Budget(time_s=100.0, reserve_s=0.0))
    clock1.advance(80)
    assert first.progress() == pytest.approx(0.8)
    state = first.state_dict()
    resumed = BudgetClock(Budget(time_s=400.0, reserve_s=0.0), clock=FakeClock(0.0))
    resumed.load_state_dict(state)
    assert resumed.elapsed() == pytest.approx(80.0)
    assert resumed.progress() == pytest.approx(0.2)


def test_spent_s_constructor_argument():
    bc, clock = make(Budget(time_s=100.0, reserve_s=0.0), spent_s=60.0)
    assert bc.elapsed() == pytest.approx(60.0)
    clock.advance(20)
    assert bc.progress() == pytest.approx(0.8)


# --------------------------------------------------------------------------- schedule progress and cadence


def test_schedule_progress_starts_at_the_first_optimizer_step():
    """Data preparation and the first eval use budget time but not schedule progress: warmup starts at step 1."""
    budget = Budget(time_s=100.0, reserve_s=10.0)
    clock, fake = make(budget)
    fake.advance(30)  # tokenisation + first eval
    assert clock.progress() == pytest.approx(30 / 90)
    clock.start_training()
    assert clock.schedule_progress() == 0.0
    fake.advance(30)  # half of what is left before the reserve
    assert clock.schedule_progress() == pytest.approx(0.5)
    assert clock.progress() == pytest.approx(60 / 90)
    fake.advance(30)  # the budget's end is the schedule's end
    assert clock.schedule_progress() == pytest.approx(1.0) and clock.progress() == pytest.approx(1.0)
    clock.start_training()  # a second call (every step makes it) changes nothing
    assert clock.train_start_s == pytest.approx(30.0)


def test_schedule_progress_survives_resume_with_a_larger_budget():
    clock, fake = make(Budget(time_s=100.0, reserve_s=0.0))
    fake.advance(20)
    clock.start_training()
    fake.advance(40)
    state = clock.state_dict()
    resumed, _ = make(Budget(time_s=180.0, reserve_s=0.0))
    resumed.load_state_dict(state)
    assert resumed.schedule_progress() == pytest.approx(40 / 160)  # counted from the first step, against the new budget


def test_token_budget_schedule_progress_equals_progress():
    clock, _ = make(Budget(tokens=1000))
    clock.start_training()
    clock.record_step(250, 1.0)
    assert clock.schedule_progress() == clock.progress() == pytest.approx(0.25)


@pytest.mark.parametrize("time_s, cost, expected", [
    (150.0, 2.0, ("progress", 0.5)),   # 2% of 150 s = 3 s buys one 2 s eval, at the middle
    (150.0, 4.0, None),                 # not even one
    (600.0, 3.0, ("progress", 0.2)),   # 12 s buys four
    (36000.0, 5.0, ("progress", 0.1)),  # a 10-hour run: capped at nine (every 10%)
])
def test_auto_eval_interval_prices_evals_into_a_time_budget(time_s, cost, expected):
    from budgetune.budget import auto_eval_interval

    got = auto_eval_interval(Budget(time_s=time_s), cost)
    assert got == (expected if expected is None else pytest.approx(expected))


def test_auto_eval_interval_without_a_time_budget_is_every_quarter():
    from budgetune.budget import auto_eval_interval

    assert auto_eval_interval(Budget(steps=100), 50.0) == ("progress", 0.25)
