"""Fault injection: SIGKILL `budgetune train` at random moments — some while a checkpoint is
being written — resume each time, and end with the weights of an uninterrupted run.

Checked after every kill: the resume succeeds, every checkpoint on disk loads (a torn write
is never picked up), and the steps lost are at most one checkpoint interval.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budgetune.checkpoint import list_checkpoints

from helpers import tiny_config, write_text_corpus

KILLS = 10
STEPS = 600  # enough that 10 kills land before the end on a fast idle machine
INTERVAL = 4  # steps between checkpoints


def start(cfg_path: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "budgetune", "train", str(cfg_path), "--quiet"] + (["--resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path, offset: int) -> list[int]:
    """Optimizer steps written to metrics.jsonl after byte `offset` (this attempt's lines)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    if path.stat().st_size < offset:  # a resume before the first checkpoint starts the metrics afresh
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed writer
            continue
        if "event" not in record:
            out.append(record["step"])
    return out


def check_all_checkpoints_load(run: Path) -> int:
    """Every complete checkpoint reads back; return the newest step (0 if none)."""
    found = list_checkpoints(run / "checkpoints")
    for ckpt in found:
        state = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "trainable.safetensors"))
        torch.load(ckpt / "optimizer.pt", weights_only=True)
        load_file(str(ckpt / "rng.safetensors"))
        assert state["step"] == int(ckpt.name.split("-")[1]) and weights
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
def test_random_sigkills_lose_at_most_one_interval_and_end_where_an_uninterrupted_run_ends(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=6)
    rng = random.Random(1234)

    def config(name: str) -> Path:
        cfg = tiny_config(tmp_path / name, corpus, budget={"steps": STEPS}, checkpoint={"every": INTERVAL / STEPS, "keep": 2},
                          train={"micro_batch": 2, "seed": 0, "deterministic": True})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight = subprocess.run([sys.executable, "-m", "budgetune", "train", str(config("straight")), "--quiet"],
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    path, run = config("killed"), tmp_path / "killed" / "run"
    kills = mid_write = 0
    resume = False
    while kills < KILLS:
        offset = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
        proc = start(path, resume)
        resume = True
        during_write = kills % 3 == 2  # every third kill aims at a checkpoint write
        deadline = time.time() + 120
        # wait until this attempt trains, then kill after a random delay or at the next checkpoint write
        while time.time() < deadline and proc.poll() is None and not logged_steps(run, offset):
            time.sleep(0.01)
        if during_write:
            while time.time() < deadline and proc.poll() is None and not list((run / "checkpoints").glob(".tmp-step-*")):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished before the kill: not enough budget left for the test
            raise AssertionError(f"the run ended before kill {kills + 1}; raise STEPS ({proc.stderr.read()[-500:]})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_write += bool(list((run / "checkpoints").glob(".tmp-step-*")))

        newest = check_all_checkpoints_load(run)
        trained = logged_steps(run, offset)
        if trained:
            # a step is logged after its update; the checkpoint at `newest` holds everything up to it
            assert max(trained) - newest <= INTERVAL, (max(trained), newest)

    if not (run / "summary.json").exists():  # the last kill can land after the run finished (while it wrote its report)
        finish = start(path, resume=True)
        _, err = finish.communicate(timeout=300)
        assert finish.returncode == 0, err
    assert not list((run / "checkpoints").glob(".tmp-*"))  # what torn writes left was cleaned up
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    ours = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    theirs = load_file(str(list_checkpoints(tmp_path / "straight" / "run" / "checkpoints")[-1] / "trainable.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
