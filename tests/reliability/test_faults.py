"""Bad numbers, out-of-memory, stop signals and a full disk: the run survives or stops
cleanly, and never saves a NaN or a torn checkpoint."""

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budgetune.checkpoint import list_checkpoints
from budgetune.errors import TrainingError
from budgetune.train import train

from helpers import tiny_config, write_text_corpus

train_module = importlib.import_module("budgetune.objectives.sft")  # where the training step (the default objective) calls token_losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def events(run, kind=None):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == kind] if kind else [e for e in lines if "event" not in e]


def poison(monkeypatch, bad_steps: set[int]):
    """token_losses returns NaN during the given (1-based) optimizer steps."""
    real, calls = train_module.token_losses, {"n": 0}

    def maybe_nan(model, batch):
        loss, count = real(model, batch)
        if model.training:  # evals run in eval mode
            calls["n"] += 1
            if calls["n"] in bad_steps:
                loss = loss * float("nan")
        return loss, count

    monkeypatch.setattr(train_module, "token_losses", maybe_nan)


def final_weights(run):
    return load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))


def test_a_nan_step_is_skipped_and_leaves_the_optimizer_untouched(tmp_path, corpus, monkeypatch):
    poison(monkeypatch, {3})
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": 8}), quiet=True)
    assert summary["bad_steps"] == 1 and summary["restores"] == 0
    assert [e["step"] for e in events(tmp_path / "run", "bad_step")] == [3]
    optimizer = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {7.0}  # 8 steps, one skipped
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_bad_steps_in_a_row_restore_the_last_checkpoint_with_half_the_lr(tmp_path, corpus, monkeypatch):
    clean = train(tiny_config(tmp_path / "clean", corpus, budget={"steps": 12}, schedule={"name": "constant", "warmup": 0}), quiet=True)
    poison(monkeypatch, {7, 8})
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": 12}, train={"max_bad_steps": 2},
                                schedule={"name": "constant", "warmup": 0}, checkpoint={"every": 0.25}), quiet=True)
    assert summary["bad_steps"] == 2 and summary["restores"] == 1
    assert [e["action"] for e in events(tmp_path / "run", "bad_step")] == ["skip", "restore"]
    lrs = {e["step"]: e["lr"] for e in events(tmp_path / "run")}
    assert lrs[6] == pytest.approx(clean["final_lr"]) and lrs[9] == pytest.approx(0.5 * clean["final_lr"])


def test_persistent_nans_stop_with_a_clear_message_and_finite_checkpoints(tmp_path, corpus, monkeypatch):
    poison(monkeypatch, set(range(5, 100)))
    with pytest.raises(TrainingError, match="non-finite .* even after going back"):
        train(tiny_config(tmp_path, corpus, budget={"steps": 30}, train={"max_bad_steps": 2}, checkpoint={"every": 0.1}), quiet=True)
    run = tmp_path / "run"
    assert list_checkpoints(run / "checkpoints")  # the folder and its checkpoints are kept
    for ckpt in list_checkpoints(run / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())


def test_nan_before_any_checkpoint_stops_and_says_so(tmp_path, corpus, monkeypatch):
    poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError, match="before the first checkpoint"):
        train(tiny_config(tmp_path, corpus, budget={"steps": 30}, train={"max_bad_steps": 3}), quiet=True)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, corpus, monkeypatch):
    straight = train(tiny_config(tmp_path / "small", corpus, budget={"steps": 6}, train={"micro_batch": 2, "grad_accum": 2}), quiet=True)
    real = train_module.token_losses

    def oom_above_2(model, batch):
        if model.training and batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(train_module, "token_losses", oom_above_2)
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": 6}, train={"micro_batch": 4, "grad_accum": 1}), quiet=True)
    assert summary["recipe"]["micro_batch"] == 2 and summary["recipe"]["grad_accum"] == 2
    assert events(tmp_path / "run", "out_of_memory") == [{"event": "out_of_memory", "step": 1, "micro_batch": 2, "grad_accum": 2}]
    assert summary["steps"] == straight["steps"] and summary["tokens"] == straight["tokens"]
    ours, theirs = final_weights(tmp_path / "run"), final_weights(tmp_path / "small" / "run")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor)


def test_out_of_memory_at_micro_batch_1_stops_with_advice(tmp_path, corpus, monkeypatch):
    def always_oom(model, batch):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(train_module, "token_losses", always_oom)
    with pytest.raises(TrainingError, match="out of memory at micro-batch 1"):
        train(tiny_config(tmp_path, corpus, train={"micro_batch": 2}), quiet=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch, code):
    import budgetune.checkpoint as checkpoint_module

    real, calls = checkpoint_module.save_file, {"n": 0}

    def fail_second_checkpoint(tensors, path, *a, **k):
        if path.endswith("trainable.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:
                real(tensors, path, *a, **k)  # part of the file is written, then the disk is full
                raise OSError(code, os.strerror(code))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", fail_second_checkpoint)
    with pytest.raises(TrainingError, match=os.strerror(code)) as e:
        train(tiny_config(tmp_path, corpus, budget={"steps": 8}, checkpoint={"every": 0.25}), quiet=True)
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000002"] and kept[0].name in str(e.value)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # no half-written folder left
    load_file(str(kept[0] / "trainable.safetensors"))  # intact
    torch.load(kept[0] / "optimizer.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_and_exits_then_resume_finishes(tmp_path, corpus, sig):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 100000, "time": "60s"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "budgetune", "train", str(path), "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(events(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10
    assert proc.returncode == 128 + sig, err
    assert "checkpoint written" in err and "--resume" in err
    step = int(list_checkpoints(run / "checkpoints")[-1].name.split("-")[1])
    assert step >= max(e["step"] for e in events(run)) >= 3  # nothing trained after the checkpoint is lost
    cfg["budget"] = {"steps": step + 3}
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "budgetune", "train", str(path), "--resume", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 3
