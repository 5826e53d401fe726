"""AdaLoRA through peft, scheduled on budget progress: ranks are pruned to the target by
the end of the budget whatever the step count, the orthogonality penalty is applied, the
importance scores survive a resume, and the pruned adapter exports and reloads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from budgetune.evaluate import load_trained
from budgetune.export import export
from budgetune.methods import METHODS
from budgetune.train import train

from helpers import interrupted_and_uninterrupted, tiny_config, write_chat_jsonl


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl")


def _ranks(model) -> list[int]:
    """Surviving (non-zero) singular triplets per adapted matrix."""
    return [int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n]


@pytest.mark.parametrize("steps", [6, 40])
def test_budget_progress_drives_the_rank_schedule(tmp_path, chat, monkeypatch, steps):
    method = METHODS["adalora"]
    calls = []
    real = method.after_update
    monkeypatch.setattr(method, "after_update", lambda model, opts, p: (calls.append(p), real(model, opts, p)))
    summary = train(tiny_config(tmp_path, chat, method={"name": "adalora", "init_r": 6, "target_r": 2},
                                budget={"steps": steps}, optim={"lr": 1e-2}), quiet=True)
    assert calls[-1] == pytest.approx(1.0) and len(calls) == steps
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    trained, tokenizer, _ = load_trained(tmp_path / "run")
    ranks = _ranks(trained)
    # the final allocation keeps target_r per matrix on average (peft prunes to the budget, ties may keep a few more)
    assert sum(ranks) <= 2 * len(ranks) + 2 and max(ranks) <= 6
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base")
    for n, p in trained.named_parameters():  # only the adapter trained: the base inside is unchanged
        if "lora_" not in n and "ranknum" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p, base.state_dict()[key], rtol=0, atol=0)
    config = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # saved with the adapter: peft reloads the pruned shapes

    # the exported merged model equals the adapter on its base
    merged = AutoModelForCausalLM.from_pretrained(export(tmp_path / "run", merge=True))
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_trainable_parameters_match_the_formula(tmp_path, chat):
    summary = train(tiny_config(tmp_path, chat, method={"name": "adalora", "init_r": 6, "target_r": 2}, budget={"steps": 1}), quiet=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base")
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert summary["trainable_parameters"] == sum(6 * (m.in_features + m.out_features + 1) for m in linears)
    assert summary["predicted"] is not None  # the planner counts it on a meta-device model


def test_orthogonality_penalty_is_zero_for_orthonormal_factors():
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    method = METHODS["adalora"]
    model = method.prepare(model, method.Options(init_r=4, target_r=2, target_modules=["q_proj"]))
    assert method.regularizer(model) > 0  # random init: not orthonormal
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.eye(*p.shape))
            if "lora_B" in n:
                p.copy_(torch.eye(*p.shape))
    assert method.regularizer(model).item() == pytest.approx(0.0, abs=1e-6)


def test_resume_is_exact(tmp_path, chat, monkeypatch):
    straight, resumed = interrupted_and_uninterrupted(
        tmp_path, chat, monkeypatch, method={"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 0.1, "tfinal": 0.3},
        budget={"steps": 10}, optim={"lr": 1e-2}, checkpoint={"every": 0.5})
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_single_process_save_does_not_warn_about_ungathered_shards(tmp_path):
    """A matrix pruned to rank 0 saves as zero-sized lora_A/lora_B: legitimate here, not ZeRO-3 shards."""
    import warnings

    from transformers import LlamaConfig

    method = METHODS["adalora"]
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    model = method.prepare(AutoModelForCausalLM.from_config(config), method.Options(init_r=4, target_r=2))
    peft_cfg = model.peft_config["default"]
    names = sorted({n.split(".lora_E")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if "lora_E" in n})
    peft_cfg.rank_pattern = {f"{n}.lora_E": [False] * 4 for n in names[:1]} | {f"{n}.lora_E": [True] * 4 for n in names[1:]}
    with warnings.catch_warnings(record=True) as caught:  # peft's own save warns about the rank-0 matrix ...
        warnings.simplefilter("always")
        model.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
    assert any("were not gathered" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:  # ... ours, in one process, does not
        warnings.simplefilter("always")
        method.save_pretrained(model, tmp_path / "ours")
    assert not any("were not gathered" in str(w.message) for w in caught)
    assert (tmp_path / "ours" / "adapter_model.safetensors").exists()
