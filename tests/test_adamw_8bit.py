"""8-bit AdamW through bitsandbytes: uint8 moments, close to fp32 AdamW, resumable."""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from budgetune.config import OptimConfig  # noqa: E402
from budgetune.optim import build_optimizer  # noqa: E402
from budgetune.plan.memory import estimate_memory  # noqa: E402
from budgetune.plan.recipe import Recipe  # noqa: E402

from helpers import interrupted_and_uninterrupted, write_chat_jsonl  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128, bias=False))


def test_states_are_8_bit_and_steps_track_fp32_adamw():
    a, b = _model(), _model()
    cfg = OptimConfig(lr=1e-2, beta2=0.999)
    ours = build_optimizer(a, OptimConfig(name="adamw8bit", lr=1e-2, beta2=0.999))
    ref = build_optimizer(b, cfg)
    x = torch.randn(32, 128)
    for _ in range(5):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    big = a[0].weight
    state = ours.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # moments + per-block absmax (the two 256-entry code books per tensor are a fixed 2 KB)
    state_bytes = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert big.numel() * 2 <= state_bytes < big.numel() * 2.2
    moved = (b[0].weight - _model()[0].weight).abs().mean()
    assert (a[0].weight - b[0].weight).abs().mean() < 0.05 * moved  # within 5% of how far AdamW moved


def test_memory_model_counts_quarter_size_states():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    fp32 = estimate_memory(config, Recipe(method="full", optimizer="adamw")).terms["optimizer_states"]
    int8 = estimate_memory(config, Recipe(method="full", optimizer="adamw8bit")).terms["optimizer_states"]
    assert int8 == pytest.approx(fp32 / 4, rel=0.03)


def test_trains_and_resumes_exactly_through_budgetune(tmp_path, monkeypatch):
    chat = write_chat_jsonl(tmp_path / "chat.jsonl")
    straight, resumed = interrupted_and_uninterrupted(tmp_path, chat, monkeypatch, optim={"name": "adamw8bit", "lr": 1e-2},
                                                      budget={"steps": 8}, checkpoint={"every": 0.5})
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
