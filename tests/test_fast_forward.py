"""Fast Forward: repeat the last update while the held-out loss falls, undo the one that rises."""

import json

import pytest
import torch

from budgetune.errors import ConfigError
from budgetune.fast_forward import FastForward
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl


def test_repeats_until_the_loss_rises_and_takes_that_one_back():
    x = torch.zeros(3)
    target = torch.tensor([10.0, 10.0, 10.0])
    ff = FastForward(every=1, loss=lambda: float(((x - target) ** 2).sum()), keep_going=lambda: True)
    x -= 1.0
    ff.remember([x])  # θ_{t-1} = -1
    x += 1.0  # the optimizer step: Δ = +1, θ_t = 0
    kept, loss = ff.run([x])
    assert kept == 10 and torch.equal(x, target) and loss == 0.0  # the 11th repeat overshot and was undone
    assert ff.repeats == 10


def test_stops_when_the_budget_says_so():
    x = torch.zeros(1)
    calls = iter([True, True, False])
    ff = FastForward(every=1, loss=lambda: float((x - 100) ** 2), keep_going=lambda: next(calls))
    ff.remember([x - 1])
    assert ff.run([x])[0] == 2


def test_lora_run_fast_forwards_on_schedule(tmp_path):
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", n=120)
    cfg = tiny_config(tmp_path, chat, method={"name": "lora", "r": 4}, budget={"steps": 12}, optim={"lr": 1e-2},
                      train={"fast_forward": 3, "fast_forward_rows": 2})
    cfg["data"]["eval_fraction"] = 0.2
    summary = train(cfg, quiet=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [e for e in events if e.get("event") == "fast_forward"]
    assert [e["step"] for e in stages] == [3, 6, 9, 12]
    assert summary["steps"] == 12  # repeats are not optimizer steps
    assert summary["fast_forward_repeats"] == sum(e["repeats"] for e in stages)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_refused_for_full_fine_tuning(tmp_path):
    chat = write_chat_jsonl(tmp_path / "chat.jsonl")
    with pytest.raises(ConfigError, match="train.fast_forward"):
        train(tiny_config(tmp_path, chat, train={"fast_forward": 3}), quiet=True)
