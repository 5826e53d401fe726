"""End to end: train, checkpoint, resume, budgets — on tiny random-init models."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from budgetune.checkpoint import list_checkpoints
from budgetune.errors import BudgetuneError
from budgetune.metrics import read_metrics
from budgetune.train import train

from helpers import interrupted_and_uninterrupted, tiny_config, write_chat_jsonl, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def test_full_finetune_learns_and_writes_run(tmp_path, corpus):
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": 25}), quiet=True)
    run = tmp_path / "run"
    assert summary["steps"] == 25
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 26))
    assert {"step", "tokens", "seconds", "loss", "lr", "tokens_per_s", "memory_mb"} <= set(steps[0])
    assert steps[-1]["lr"] < steps[3]["lr"]  # cosine annealed to (near) zero at the end of the budget
    assert json.loads((run / "summary.json").read_text())["steps"] == 25
    assert list_checkpoints(run / "checkpoints")
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.vocab_size >= 300


def test_instruction_data_trains_only_on_assistant_tokens(tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    summary = train(tiny_config(tmp_path, data, budget={"steps": 20}), quiet=True)
    assert summary["data"]["format"] == "chat"
    assert summary["data"]["padding_fraction"] < 0.2  # packing fills rows
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def _final_weights(run):
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    return load_file(str(ckpt / "trainable.safetensors"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_equals_uninterrupted(tmp_path, corpus, monkeypatch, method):
    a, b = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch, budget={"steps": 10},
                                         checkpoint={"every": 0.4, "keep": 3}, method={"name": method})
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_time_budget_is_kept(tmp_path, corpus):
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": None, "time": "8s"}, eval={"every": 0.5}), quiet=True)
    assert summary["governing_budget"] == "time"
    assert abs(summary["overshoot_s"]) <= 5.0
    assert summary["steps"] > 5


def test_tokens_budget_governs(tmp_path, corpus):
    summary = train(tiny_config(tmp_path, corpus, budget={"steps": None, "tokens": 3000}), quiet=True)
    assert summary["governing_budget"] == "tokens"
    assert 3000 <= summary["tokens"] < 3000 + 4 * 64  # stops within one step of the budget


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 2})
    train(cfg, quiet=True)
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(BudgetuneError, match="already holds"):
        train(cfg, quiet=True)
    assert (tmp_path / "run" / "summary.json").read_text() == before
    train(cfg, quiet=True, overwrite=True)
    cfg["output"]["overwrite"] = True  # the config key works like --overwrite
    train(cfg, quiet=True)


def test_gradient_accumulation_matches_larger_batch(tmp_path, corpus):
    """micro_batch 2 × accumulation 2 takes the same steps as micro_batch 4 (exact token mean)."""
    one = train(tiny_config(tmp_path / "one", corpus, budget={"steps": 3}, train={"micro_batch": 4}), quiet=True)
    two = train(tiny_config(tmp_path / "two", corpus, budget={"steps": 3}, train={"micro_batch": 2, "grad_accum": 2}), quiet=True)
    a, b = _final_weights(tmp_path / "one" / "run"), _final_weights(tmp_path / "two" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert one["tokens"] == two["tokens"]


def test_python_api_functions_survive_submodule_imports(tmp_path, corpus):
    import budgetune
    import budgetune.evaluate  # noqa: F401  (would shadow the function if the package imported lazily)

    first = budgetune.train(tiny_config(tmp_path / "a", corpus, budget={"steps": 2}), quiet=True)
    second = budgetune.train(tiny_config(tmp_path / "b", corpus, budget={"steps": 2}), quiet=True)
    assert first["steps"] == second["steps"] == 2
    assert budgetune.evaluate(tmp_path / "a" / "run")["eval_loss"] == pytest.approx(first["eval_loss_after"], rel=1e-4)
