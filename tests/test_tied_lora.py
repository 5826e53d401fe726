"""Tied-LoRA: shared A/B per module type, per-layer u/v; parameter count, training, merged export."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.evaluate import load_trained
from budgetune.export import export
from budgetune.methods import METHODS
from budgetune.models import count_parameters
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl


def small_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                         num_attention_heads=4, num_key_value_heads=2))


def test_parameter_count_matches_the_formula_and_is_a_fraction_of_lora():
    r = 8
    model = small_llama()
    linears = {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers.0." in n}
    tied = METHODS["tied-lora"].prepare(model, METHODS["tied-lora"].Options(r=r))
    trainable, _ = count_parameters(tied)
    shared = sum(r * (m.in_features + m.out_features) for m in linears.values())
    per_layer = sum(r + m.out_features for m in linears.values())
    assert trainable == shared + 4 * per_layer
    lora_model = METHODS["lora"].prepare(small_llama(), METHODS["lora"].Options(r=r))
    lora_trainable, _ = count_parameters(lora_model)
    assert lora_trainable == 4 * shared
    assert trainable <= 0.5 * lora_trainable  # 4 layers; the share falls with depth (~13% at 32 layers)


def test_starts_as_the_base_model_and_update_has_the_tied_form():
    base = small_llama()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    method = METHODS["tied-lora"]
    model = method.prepare(small_llama(), method.Options(r=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # B = 0
        q0 = model.model.layers[0].self_attn.q_proj
        q1 = model.model.layers[1].self_attn.q_proj
        assert q0.pair[0] is q1.pair[0]  # tied across layers
        q0.pair[0]["B"].normal_()
        q0.u.uniform_()
        q0.v.uniform_()
        a, b = q0.pair[0]["A"], q0.pair[0]["B"]
        torch.testing.assert_close(q0.delta(), 2.0 * torch.diag(q0.v) @ b @ torch.diag(q0.u) @ a)
        x = torch.randn(3, 64)
        torch.testing.assert_close(q0(x), x @ (q0.base.weight + q0.delta()).T)


def test_trains_and_exports_merged(tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    summary = train(tiny_config(tmp_path, data, method={"name": "tied-lora", "r": 4}, budget={"steps": 10}, optim={"lr": 1e-2}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    run = tmp_path / "run"
    model, tokenizer, _ = load_trained(run)  # run/model is a plain transformers folder
    assert not any("tied_lora" in n or n.endswith(".u") for n, _ in model.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits)
    assert summary["eval_loss_after"] == pytest.approx(__import__("budgetune").evaluate(run)["eval_loss"], rel=1e-4)
