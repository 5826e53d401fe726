"""The budget's promises at the edges: budgets too small to train, steps that would repeat rows,
resume of unstarted and finished runs, files the disk damaged, two writers, a busy machine."""

import importlib
import json
import subprocess
import sys

import pytest
import yaml

from budgetune.checkpoint import damage, list_checkpoints, newest_intact
from budgetune.config import load_config
from budgetune.errors import BudgetuneError
from budgetune.metrics import read_metrics
from budgetune.rundir import RunDir
from budgetune.schedules import lr_multiplier, rewarmed
from budgetune.train import train

from helpers import tiny_config, write_text_corpus

step_module = importlib.import_module("budgetune.step")
train_module = importlib.import_module("budgetune.train")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def metric_steps(run, key="step"):
    """`key` of every optimizer step in the run's metrics.jsonl."""
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if "event" not in r]


def test_a_budget_that_buys_no_step_is_refused_before_training(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": None, "time": "3s", "reserve": "3s"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "budgetune", "train", str(path), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "cannot buy one optimizer step" in done.stderr and "Raise budget.time" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_step_never_holds_a_row_twice(tmp_path):
    small = write_text_corpus(tmp_path / "small", n_files=1)
    summary = train(tiny_config(tmp_path, small, budget={"steps": 2}, train={"micro_batch": 64, "grad_accum": 2}), quiet=True)
    per_step = summary["recipe"]["micro_batch"] * summary["recipe"]["grad_accum"]
    assert summary["data"]["train_rows"] < 128  # the config asked for more rows per step than the data has
    assert per_step <= summary["data"]["train_rows"]


def test_time_budget_reports_its_utilisation(tmp_path, corpus):
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": None, "time": "6s"}), quiet=True)
    assert 0 < summary["budget_utilisation"] <= 1
    assert summary["train_steps_s"] == pytest.approx(summary["budget_utilisation"] * 6, rel=1e-3)


def test_resume_before_the_first_checkpoint_starts_fresh_with_clean_metrics(tmp_path, corpus, monkeypatch):
    real, calls = step_module.update, {"n": 0}

    def die_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill before any checkpoint
        return real(*args, **kwargs)

    cfg = tiny_config(tmp_path, corpus, budget={"steps": 6})
    monkeypatch.setattr(step_module, "update", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    assert metric_steps(tmp_path / "run") == [1, 2, 3]
    monkeypatch.setattr(step_module, "update", real)
    summary = train(cfg, resume=True, quiet=True)
    assert summary["steps"] == 6
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]  # not 1-3 twice


def test_resume_of_a_finished_run_needs_extend_and_a_larger_budget(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 4})
    train(cfg, quiet=True)
    with pytest.raises(BudgetuneError, match="finished run .*--extend"):
        train(cfg, resume=True, quiet=True)
    with pytest.raises(BudgetuneError, match="already spent"):
        train(cfg, resume=True, extend=True, quiet=True)
    summary = train(cfg, ["--budget.steps", "7"], resume=True, extend=True, quiet=True)
    assert summary["steps"] == 7 and metric_steps(tmp_path / "run") == list(range(1, 8))


def test_an_extended_run_rewarms_its_lr_and_a_kill_keeps_the_ramp(tmp_path, corpus, monkeypatch):
    """A finished run (its LR annealed to ~0) extended onto a larger budget ramps the LR from where it stopped to the
    new schedule over schedule.warmup, instead of jumping near the peak; killed inside the ramp and resumed, it goes
    on with the same ramp."""
    checkpoint_module = importlib.import_module("budgetune.checkpoint")
    sections = {"budget": {"steps": 6}, "schedule": {"name": "cosine", "warmup": 0.5}, "checkpoint": {"every": 0.25}}
    for name in ("a", "b"):
        train(tiny_config(tmp_path / name, corpus, **sections), quiet=True)
    last = metric_steps(tmp_path / "a" / "run", "lr")[-1]
    assert last < 0.05 * 3e-3  # annealed
    train(tiny_config(tmp_path / "a", corpus, **sections), ["--budget.steps", "24"], resume=True, extend=True, quiet=True)
    lrs = metric_steps(tmp_path / "a" / "run", "lr")[6:]
    cfg = load_config(tiny_config(tmp_path / "a", corpus, **sections))
    for step, lr in enumerate(lrs, start=7):  # progress is steps / 24; the extension took up at 6 / 24
        q = (step - 0.5) / 24
        assert lr == pytest.approx(rewarmed(3e-3 * lr_multiplier(q, cfg.schedule), q, 6 / 24, last, 0.5))
    assert lrs[0] < 0.1 * 3e-3 * lr_multiplier(6.5 / 24, cfg.schedule)  # not the jump to ~0.8 of the peak
    assert lrs[0] < lrs[1] < lrs[2]  # up the ramp (it ends at progress 0.75, step 18; the cosine is falling by then)
    assert lrs[-1] < 0.05 * 3e-3

    real_save = checkpoint_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):  # killed at its first checkpoint of the extension: step 12, inside the ramp
        train(tiny_config(tmp_path / "b", corpus, **sections), ["--budget.steps", "24"], resume=True, extend=True, quiet=True)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    assert list_checkpoints(tmp_path / "b" / "run" / "checkpoints")[-1].name.endswith("12")
    train(tiny_config(tmp_path / "b", corpus, **sections), ["--budget.steps", "24"], resume=True, extend=True, quiet=True)
    assert metric_steps(tmp_path / "b" / "run", "lr") == pytest.approx(metric_steps(tmp_path / "a" / "run", "lr"), rel=1e-9)


def test_a_damaged_checkpoint_is_skipped_naming_it(tmp_path, corpus, capsys):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 8}, checkpoint={"every": 0.25, "keep": 3})
    train(cfg, quiet=True)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    newest = ckpts[-1] / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by the disk
    assert "trainable.safetensors" in damage(ckpts[-1])
    assert damage(ckpts[-2]) is None
    assert newest_intact(tmp_path / "run" / "checkpoints") == ckpts[-2]
    summary = train(cfg, ["--budget.steps", "10"], resume=True, extend=True)
    assert summary["steps"] == 10
    assert f"checkpoint {ckpts[-1].name} is damaged" in capsys.readouterr().out


def test_a_damaged_tokenisation_cache_is_rebuilt(tmp_path, corpus, capsys):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 1})
    train(cfg, quiet=True)
    for meta in (tmp_path / "cache" / "tokenized").glob("*/meta.json"):
        meta.write_text("{junk")
    summary = train(cfg, overwrite=True)
    assert summary["steps"] == 1
    assert "is damaged" in capsys.readouterr().out


def test_one_writer_per_run_folder(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 2})
    train(cfg, quiet=True)
    held = RunDir(tmp_path / "run").lock_and_sign()  # a live trainer
    try:
        with pytest.raises(BudgetuneError, match=r"being written by a live training process \(pid \d+\)"):
            train(cfg, ["--budget.steps", "3"], resume=True, extend=True, quiet=True)
    finally:
        held.close()
    assert train(cfg, ["--budget.steps", "3"], resume=True, extend=True, quiet=True)["steps"] == 3  # a dead holder leaves no lock


def test_a_busy_machine_is_named_once(tmp_path, corpus, monkeypatch):
    real = train_module.plan_for_training

    def probe_said_fast(cfg, log=print):
        cfg, prediction = real(cfg, log=log)
        return cfg, dict(prediction or {}, measured_tokens_per_s=1e12, tokens_per_s=1e12, peak_memory_mb=0)

    monkeypatch.setattr(train_module, "plan_for_training", probe_said_fast)
    train(tiny_config(tmp_path, corpus, budget={"steps": 8}), quiet=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    slow = [e for e in events if e.get("event") == "slow"]
    assert len(slow) == 1 and slow[0]["step"] == 5 and "load" in slow[0]
