"""The budget race (`budgetune tune`): halving bookkeeping, the candidate space, pinned keys, the time promise,
resume mid-race and while training the winner."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from budgetune.config import load_config
from budgetune.metrics import read_metrics
from budgetune.rundir import RunDir
from budgetune.tune import Race, _Clock, race_cost, rung_sizes, shrink_space, successive_halving
from helpers import tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("tune-corpus"))


# --- the bookkeeping, with a fake objective -----------------------------------------------------------------


def test_rung_sizes_and_cost():
    assert rung_sizes(9, 3) == [9, 3]
    assert rung_sizes(27, 3) == [27, 9, 3]
    assert rung_sizes(4, 3) == [4]
    assert rung_sizes(2, 2) == [2]
    assert rung_sizes(1, 3) == []
    # 9 trials of 1 slice, then 3 survivors continue from their state to 3 slices: 2 more each
    assert race_cost(9, 3) == (9 + 3 * 2, 12)
    # WSD branching: each reading also pays a branch of 0.2 × the trial's length so far, and a second call
    assert race_cost(9, 3, 0.2) == pytest.approx((9 * 1.2 + 3 * (2 + 0.6), 24))


def test_successive_halving_keeps_the_best_third_at_each_rung():
    # trial i's loss at rung r: trial 2 leads early, but trial 5 improves fastest and wins at the last rung
    def loss(i, rung):
        return {2: 1.0 - 0.05 * rung, 5: 1.3 - 0.5 * rung, 7: float("nan")}.get(i, 2.0 + i / 10 - 0.1 * rung)

    calls = []

    def evaluate(i, rung):
        calls.append((i, rung))
        return loss(i, rung)

    winner, results = successive_halving(list(range(9)), 3, evaluate)
    assert winner == 5
    assert len(calls) == 9 + 3  # 9 at rung 0, the best 3 at rung 1
    assert sorted(i for i, r in calls if r == 1) == [0, 2, 5]  # rung 0 order: 2 (1.0), 5 (1.3), 0 (2.0); 7 (NaN) last
    assert results[(7, 0)] != results[(7, 0)]  # a diverged trial is recorded and stopped, never promoted


def test_successive_halving_resumes_without_evaluating_again():
    def loss(i, rung):
        return (i - 4) ** 2 + 1.0 / (rung + 1)

    winner, full = successive_halving(list(range(9)), 3, loss)
    known = {k: v for k, v in list(full.items())[:10]}  # killed after 10 of the 12 readings
    calls = []
    again, results = successive_halving(list(range(9)), 3, lambda i, r: calls.append((i, r)) or loss(i, r), dict(known))
    assert again == winner == 4
    assert len(calls) == 2 and all(c not in known for c in calls)
    assert results == full


def test_ties_go_to_the_earlier_candidate():
    winner, _ = successive_halving([3, 1, 2], 3, lambda i, r: 1.0)
    assert winner == 3


def test_a_space_too_large_is_shrunk_ranks_first_then_methods_then_lr():
    dims = {"ranks": [16, 8, 32], "combos": ["full", "lora"], "lr": [1.0, 0.5, 2.0, 0.25, 4.0]}
    out, cut = shrink_space(dims, 30)
    assert out == dims and cut == []
    out, cut = shrink_space(dims, 12)
    assert out["ranks"] == [16] and len(out["combos"]) == 2 and len(out["lr"]) == 5 and cut == ["adapter rank left at 16"]
    out, cut = shrink_space(dims, 4)
    assert out["combos"] == ["full"] and out["lr"] == [0.25, 1.0, 4.0]  # LR only, the grid's ends and centre
    assert cut[-1] == "LR grid thinned from 5 to 3 points"
    out, _ = shrink_space(dims, 2)
    assert out["lr"] == [0.5, 2.0]


# --- planning the race on a real config (no training) ----------------------------------------------------------


def _plan(tmp_path, corpus, budget=None, **sections) -> tuple[dict, list[str]]:
    cfg_dict = tiny_config(tmp_path, corpus, budget=budget or {"steps": None, "tokens": 60_000}, **sections)
    for section, key in (("train", "micro_batch"), ("optim", "lr")):
        if key not in sections.get(section, {}):
            del cfg_dict[section][key]  # left open, as a user would
    cfg = load_config(cfg_dict)
    run_dir = RunDir(Path(cfg.output.dir))
    run_dir.path.mkdir(parents=True)
    lines: list[str] = []
    state = Race(cfg, run_dir, _Clock(), lines.append, quiet=True).plan()
    return state, lines


def test_the_race_budget_decides_how_many_candidates_and_says_so(tmp_path, corpus):
    state, lines = _plan(tmp_path, corpus, tune={"min_steps": 8})
    # 15% of 60k tokens = 9k; the planner's 320-token steps, 8 of them per first-rung slice: 3 candidates fit,
    # of 5 LRs × (full + lora × 3 ranks) = 20
    assert state["step_tokens"] == 320
    assert state["space_size"] == 20 and state["affordable"] == 3
    assert len(state["trials"]) <= 3
    text = "\n".join(lines)
    assert "affords 3 candidates" in text and "the space has 20" in text
    assert "the space is too large for this budget" in text and "LR grid thinned" in text
    assert {t["method"] for t in state["trials"]} == {"full"}  # a tiny budget races LR only


def test_a_flops_budget_is_raced_in_tokens_of_the_planned_recipe(tmp_path, corpus):
    tokens, _ = _plan(tmp_path / "tokens", corpus, tune={"min_steps": 8})
    fpt = tokens["budget"]["flops_per_token"]
    assert fpt > 0
    flops, lines = _plan(tmp_path / "flops", corpus, budget={"steps": None, "flops": 60_000 * fpt}, tune={"min_steps": 8})
    assert flops["budget"]["total"] == pytest.approx(60_000)
    assert flops["affordable"] == tokens["affordable"] and len(flops["trials"]) == len(tokens["trials"])


def test_pinned_keys_stay_pinned(tmp_path, corpus):
    state, _ = _plan(tmp_path, corpus, optim={"lr": 2e-3}, method={"name": "lora", "r": 4},
                     tune={"min_steps": 2, "space": {"methods": ["full", "lora"], "ranks": [4, 8, 16]}})
    assert state["trials"] == [] and state["space_size"] == 1  # nothing left to race
    state, lines = _plan(tmp_path / "b", corpus, method={"name": "lora"}, tune={"min_steps": 1, "space": {"ranks": [4, 8]}})
    assert {t["method"] for t in state["trials"]} == {"lora"}
    assert {t["rank"] for t in state["trials"]} == {4, 8}
    state, _ = _plan(tmp_path / "c", corpus, optim={"lr": 2e-3}, tune={"min_steps": 2, "space": {"ranks": [8]}})
    assert {t["lr"] for t in state["trials"]} == {2e-3} and {t["method"] for t in state["trials"]} == {"full", "lora"}


def test_the_lr_grid_is_centred_on_each_methods_own_lr(tmp_path, corpus):
    from budgetune.plan.batch import ADAPTER_LR_SCALE

    state, _ = _plan(tmp_path, corpus, tune={"min_steps": 1, "space": {"methods": ["full", "lora"], "ranks": [8], "lr": [1.0]}})
    lr = {t["method"]: t["lr"] for t in state["trials"]}
    assert lr["lora"] == pytest.approx(ADAPTER_LR_SCALE * lr["full"]) and state["lr_centre"] == pytest.approx(lr["full"])
    # the planner's method is the adapter: its planned LR is already its own, the grid does not scale it again
    state, _ = _plan(tmp_path / "b", corpus, method={"name": "lora"}, tune={"min_steps": 1, "space": {"ranks": [8], "lr": [0.5, 1.0]}})
    assert sorted(t["lr"] for t in state["trials"]) == pytest.approx([0.5 * state["lr_centre"], state["lr_centre"]])


# --- end to end ---------------------------------------------------------------------------------------------------


def _tune_config(tmp_path, corpus, **budget) -> dict:
    cfg = tiny_config(tmp_path, corpus, budget={"steps": None, **budget}, tune={"min_steps": 4, "space": {"ranks": [8]}})
    del cfg["train"]["micro_batch"], cfg["optim"]["lr"]
    return cfg


@pytest.mark.slow
def test_tune_races_then_trains_the_winner_from_its_trial_state(tmp_path, corpus):
    import budgetune

    cfg = _tune_config(tmp_path, corpus, tokens=16_000)
    cfg["schedule"]["warmup"] = 0.0  # from scratch a winner with a warmup restarts (the next test)
    summary = budgetune.tune(cfg, quiet=True)
    race = summary["tune"]
    run = tmp_path / "run"
    winner = next(t for t in race["trials"] if t["state"] == "winner")
    assert race["candidates"] >= 2 and race["winner"] == winner["label"]
    # the winner continued from its trial: its lineage's steps are part of the final run's
    assert not race["winner_restarted"]
    assert summary["steps"] > winner["rungs"][-1]["steps"]
    # every token trained counts: the whole budget, race included
    assert race["tokens_including_race"] == pytest.approx(16_000, abs=2 * 256)
    assert 0 < race["race_share"] <= 0.15 + 0.02
    for t in race["trials"]:
        kept = (run / "trials" / f"{t['id']:02d}-{t['label']}" / "checkpoints").exists()
        assert kept == (t["state"] == "winner")  # stopped trials keep metrics and summary, not weights
    assert (run / "model" / "config.json").exists()
    page = (run / "report.html").read_text()
    assert "The race" in page and "id='race'" in page and winner["label"] in page


@pytest.mark.slow
def test_from_scratch_the_winner_restarts_on_what_the_race_left(tmp_path, corpus):
    """A trial warms up over schedule.warmup of its own slice; from scratch that is too short to go on from, so the
    winner's recipe trains afresh in the run folder on the budget the whole race (its own trial too) left. An adapter's
    random-init base goes with it (export needs it)."""
    import budgetune

    cfg = _tune_config(tmp_path, corpus, tokens=16_000)
    cfg["method"] = {"name": "lora", "r": 8}
    summary = budgetune.tune(cfg, quiet=True)
    race, run = summary["tune"], tmp_path / "run"
    winner = next(t for t in race["trials"] if t["state"] == "winner")
    assert race["candidates"] >= 2 and race["winner_restarted"]
    assert race["other_trials_tokens"] == race["race_tokens"]  # the winner's trial tokens are spent, not continued
    assert summary["tokens"] == pytest.approx(16_000 - race["race_tokens"], abs=256)
    assert race["tokens_including_race"] == pytest.approx(16_000, abs=2 * 256)
    first = next(r for r in read_metrics(run / "metrics.jsonl") if "event" not in r)
    assert first["step"] == 1 and first["lr"] < winner["lr"] / 2  # step 1 of its own warmup, not the trial's state
    assert load_config(run / "config.yaml").optim.lr == pytest.approx(winner["lr"])
    assert (run / "model" / "adapter_config.json").exists() and (run / "base" / "config.json").exists()


@pytest.mark.slow
def test_tune_keeps_the_time_promise(tmp_path, corpus):
    import budgetune

    started = time.monotonic()
    summary = budgetune.tune(_tune_config(tmp_path, corpus, time="40s"), quiet=True)
    wall = time.monotonic() - started
    race = summary["tune"]
    assert race["candidates"] >= 2
    assert abs(race["command_overshoot_s"]) <= max(0.02 * 40, 5.0)
    assert wall <= 40 + 5.0 + 3.0  # + imports and the process's first model load, before the budget clock


def test_a_budget_too_small_to_race_trains_the_planned_recipe_without_planning_twice(tmp_path, corpus, monkeypatch):
    """No race: the plain run keeps the batch (and scratch LR) the race's planning chose from its timed step, so the
    one-step probe is paid once, not again by `train`."""
    import budgetune
    from budgetune.plan import search

    probes = []
    real = search._calibrate
    monkeypatch.setattr(search, "_calibrate", lambda *a, **k: probes.append(1) or real(*a, **k))
    cfg = _tune_config(tmp_path, corpus, time="20s")
    cfg["tune"]["min_steps"] = 100_000  # no two candidates fit in 15% of 20 s
    summary = budgetune.tune(cfg, quiet=True)
    state = json.loads((Path(summary["run_dir"]) / "tune.json").read_text())
    assert summary["tune"]["winner"] is None and "cannot afford two candidates" in summary["tune"]["why"]
    assert state["phase"] == "done" and summary["steps"] > 0
    assert len(probes) == 1
    assert summary["recipe"]["batch_tokens"] == state["step_tokens"]
    assert summary["recipe"]["lr"] == pytest.approx(state["lr_centre"])  # the planner's Step Law LR (from scratch)


def _readings(run: Path) -> dict:
    state = json.loads((run / "tune.json").read_text())
    return {(t["id"], r["rung"]): (r["loss"], r["tokens"]) for t in state["trials"] for r in t["rungs"]}


@pytest.mark.slow
def test_a_killed_race_resumes_without_rerunning_finished_trials_and_a_killed_winner_resumes(tmp_path, corpus):
    cfg = _tune_config(tmp_path, corpus, tokens=60_000)
    cfg["tune"]["min_steps"] = 3
    cfg["schedule"]["warmup"] = 0.0  # the winner continues its trial's checkpoint (from scratch it would restart)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))

    def start(resume: bool) -> subprocess.Popen:
        args = [sys.executable, "-m", "budgetune", "tune", str(path), "--quiet"] + (["--resume"] if resume else [])
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def kill_when(proc, ready, what):
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None, f"finished before {what}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"never reached {what}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def state():
        try:
            return json.loads((run / "tune.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # 1. killed mid-race, after two readings
    kill_when(start(False), lambda: (s := state()) is not None and sum(len(t["rungs"]) for t in s["trials"]) >= 2, "two readings")
    before = _readings(run)
    finished = {i for i, _ in before}
    metrics = {i: (run / t["dir"] / "metrics.jsonl").read_text() for t in state()["trials"] for i in [t["id"]] if i in finished}
    # 2. resumed; killed again while the winner trains in the run folder
    kill_when(start(True), lambda: (s := state()) is not None and s["phase"] == "winner" and (run / ".budgetune-lock").exists()
              and (run / "metrics.jsonl").exists() and "winner_config" in s, "the winner's training")
    after = _readings(run)
    assert {k: after[k] for k in before} == before  # the finished readings were not run again...
    for t in state()["trials"]:
        if t["id"] in finished and t["state"] != "winner" and len(t["rungs"]) == len([k for k in before if k[0] == t["id"]]):
            assert (run / t["dir"] / "metrics.jsonl").read_text() == metrics[t["id"]]  # ...nor their steps
    # 3. resumed to the end: the winner's run continues from its checkpoint
    done = start(True)
    assert done.wait(timeout=300) == 0, done.stderr.read()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tune"]["winner"] == next(t["label"] for t in state()["trials"] if t["state"] == "winner")
    assert summary["tune"]["tokens_including_race"] == pytest.approx(60_000, abs=2 * 256)
    assert not math.isnan(summary["eval_loss_after"])


def test_train_races_only_when_tune_fraction_is_set(tmp_path):
    """A run's saved config.yaml lists every key, tune's included: retraining from it must not race."""
    from budgetune.config import load_config
    from budgetune.tune import DEFAULT_FRACTION, claims, race_fraction

    saved = load_config({"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x.txt"]}, "budget": {"steps": 1}})
    again = load_config(saved.to_dict())  # what `budgetune train RUN/config.yaml` reads
    assert "tune.fraction" in again.explicit and not claims(again, extend=False)
    assert race_fraction(again) == DEFAULT_FRACTION
    asked = load_config({"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x.txt"]}, "budget": {"steps": 1}, "tune": {"fraction": 0.2}})
    assert claims(asked, extend=False) and not claims(asked, extend=True) and race_fraction(asked) == 0.2


def test_train_from_python_and_the_command_line_races_when_tune_fraction_is_set(tmp_path, monkeypatch):
    """`budgetune.train` and `budgetune train` go to the race when tune.fraction is set (not on --extend), else to one
    run; train.py itself never reads tune.fraction (tune.py calls it, not the other way round)."""
    import importlib

    import budgetune
    from budgetune.cli import main

    tune_module = importlib.import_module("budgetune.tune")  # the module: `budgetune.tune` is the function
    calls = []
    monkeypatch.setattr(tune_module, "tune", lambda cfg, **kw: calls.append(("race", cfg.tune.fraction, kw)) or {})
    monkeypatch.setattr(tune_module, "train", lambda cfg, **kw: calls.append(("run", cfg.tune.fraction, kw)) or {})
    base = {"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x.txt"]}, "budget": {"steps": 1}}
    asked = {**base, "tune": {"fraction": 0.2}}
    budgetune.train(asked, quiet=True)
    budgetune.train(base, quiet=True)
    budgetune.train(asked, resume=True, extend=True, quiet=True)  # a finished run trained further: no race
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    assert main(["train", str(path), "--tune.fraction", "0.25", "--quiet"]) == 0
    assert main(["train", str(path), "--quiet"]) == 0
    assert calls == [
        ("race", 0.2, {"resume": False, "overwrite": False, "quiet": True}),
        ("run", None, {"resume": False, "extend": False, "overwrite": False, "quiet": True}),
        ("run", 0.2, {"resume": True, "extend": True, "overwrite": False, "quiet": True}),
        ("race", 0.25, {"resume": False, "overwrite": False, "quiet": True}),
        ("run", None, {"resume": False, "extend": False, "overwrite": False, "quiet": True}),
    ]


def test_a_tune_on_unpacked_rows_counts_their_real_tokens_per_step(tmp_path):
    """data.pack: false on examples far shorter than data.seq_len: the race's step is the planned rows
    times the real tokens they hold (the unit its speed is measured in), and the run pinned to that
    many tokens trains the same rows."""
    import budgetune
    from budgetune.config import load_config
    from budgetune.data import row_lengths
    from budgetune.models import load_tokenizer
    from helpers import write_chat_jsonl

    cfg = _tune_config(tmp_path, write_chat_jsonl(tmp_path / "chat.jsonl", n=40), time="20s")
    cfg["data"].update(seq_len=512, pack=False)
    cfg["tune"]["min_steps"] = 100_000  # no race: the planned recipe trains
    loaded = load_config(cfg)
    mean = row_lengths(loaded, load_tokenizer(loaded, log=lambda m: None), log=lambda m: None).mean()
    summary = budgetune.tune(cfg, quiet=True)
    state = json.loads((Path(summary["run_dir"]) / "tune.json").read_text())
    rows = summary["recipe"]["micro_batch"] * summary["recipe"]["grad_accum"]
    assert mean < 200 and state["step_tokens"] == pytest.approx(rows * mean, rel=1e-3) and state["step_tokens"] < rows * 512
    assert summary["recipe"]["batch_tokens"] == state["step_tokens"]
