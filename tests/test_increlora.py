"""IncreLoRA: the rank schedule on budget progress, growth by importance, masked components
that neither act nor learn, training to the exact budget, a peft export with per-module ranks,
exact resume."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.evaluate import load_trained
from budgetune.export import export
from budgetune.methods import METHODS
from budgetune.methods.increlora import IncreLora, IncreLoraOptions, scheduled_total
from budgetune.models import count_parameters

from helpers import interrupted_and_uninterrupted, write_chat_jsonl


def test_schedule_runs_on_budget_progress():
    opts = IncreLoraOptions(init_r=1, target_r=5, tinit=0.1, tfinal=0.2)
    totals = [scheduled_total(p, 10, opts) for p in (0.0, 0.1, 0.45, 0.8, 0.9, 1.0)]
    assert totals == [10, 10, 30, 50, 50, 50]
    assert all(a <= b for a, b in zip(totals, totals[1:]))


def test_growth_goes_to_the_most_important_matrices_with_room():
    masks = {k: torch.tensor([1.0, 0, 0]) for k in "abcd"}
    masks["d"] = torch.tensor([1.0, 1, 1])  # full: no room
    IncreLora._grow(masks, {"a": 0.1, "b": 0.9, "c": 0.5, "d": 5.0}, target=8, max_r=3)
    assert {k: int(m.sum()) for k, m in masks.items()} == {"a": 1, "b": 2, "c": 2, "d": 3}
    IncreLora._grow(masks, {"a": 0.1, "b": 0.9, "c": 0.5, "d": 5.0}, target=11, max_r=3)
    assert {k: int(m.sum()) for k, m in masks.items()} == {"a": 2, "b": 3, "c": 3, "d": 3}


def test_inactive_components_neither_act_nor_learn():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    base = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    method = METHODS["increlora"]
    model = method.prepare(copy.deepcopy(base), method.Options(init_r=1, target_r=2, max_r=4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # B = 0: starts as the base model
    trainable, _ = count_parameters(model)
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert trainable == 4 * sum(m.in_features + m.out_features for m in linears)  # max_r allocated: the planner's count
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make every component able to act
    model(input_ids=ids, labels=ids).loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.grad[1:].abs().sum() == 0 and q.lora_B["default"].weight.grad[:, 1:].abs().sum() == 0
    assert q.lora_A["default"].weight.grad[0].abs().sum() > 0  # the active one learns


@pytest.mark.slow  # end-to-end: three training runs
def test_trains_to_the_budget_exports_to_peft_and_resumes_exactly(tmp_path, monkeypatch):
    from peft import PeftModel

    import budgetune

    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    method = {"name": "increlora", "init_r": 1, "target_r": 3, "max_r": 4, "tinit": 0.1, "tfinal": 0.2}
    straight, resumed = interrupted_and_uninterrupted(tmp_path, data, monkeypatch, method=method, optim={"lr": 1e-2},
                                                      budget={"steps": 12}, checkpoint={"every": 0.5})
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    run = tmp_path / "a" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["predicted"] is not None  # counted on a meta-device model
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    ranks = adapter["rank_pattern"]
    assert sum(ranks.values()) == 3 * len(ranks) and max(ranks.values()) <= 4 and min(ranks.values()) >= 1
    assert len(set(ranks.values())) > 1  # grown unevenly, by importance
    trained, tokenizer, _ = load_trained(run)
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    loaded = PeftModel.from_pretrained(base, run / "model")  # plain peft: the per-module ranks load as saved
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert summary["eval_loss_after"] == pytest.approx(budgetune.evaluate(run)["eval_loss"], rel=1e-4)
