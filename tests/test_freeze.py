"""Freeze-tuning: only the top layers (and the final norm) train; the memory model counts
them and keeps activations only for them."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from budgetune.checkpoint import list_checkpoints
from budgetune.plan.memory import architecture, estimate_memory, trainable_parameters
from budgetune.plan.recipe import Recipe
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl


def test_only_the_top_layers_train_resume_and_export(tmp_path):
    chat = write_chat_jsonl(tmp_path / "chat.jsonl")
    cfg = tiny_config(tmp_path, chat, method={"name": "freeze", "layers": 1}, budget={"steps": 8}, optim={"lr": 1e-2},
                      checkpoint={"every": 0.5})
    torch.manual_seed(cfg["train"]["seed"])
    summary = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]

    trained = AutoModelForCausalLM.from_pretrained(run / "model")  # output: a plain transformers model
    n_layers = trained.config.num_hidden_layers
    recipe = Recipe(method="freeze", extra={"method_options": {"layers": 1}})
    assert summary["trainable_parameters"] == trainable_parameters(architecture(trained.config), recipe)
    ckpt = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    top = f"model.layers.{n_layers - 1}."
    assert all(k.startswith(top) or k == "model.norm.weight" for k in ckpt), sorted(ckpt)
    assert sum(t.numel() for t in ckpt.values()) == summary["trainable_parameters"]

    # a second, untrained run from the same seed and scratch init: the frozen layers are bit-identical
    import shutil

    shutil.rmtree(run)
    cfg["budget"] = {"steps": 1}
    cfg["optim"]["lr"] = 1e-12  # the initial weights, as good as untouched
    train(cfg, quiet=True)
    initial = AutoModelForCausalLM.from_pretrained(run / "model")
    for (n, p), (_, p0) in zip(trained.named_parameters(), initial.named_parameters()):
        if not (n.startswith(top) or n == "model.norm.weight"):
            torch.testing.assert_close(p, p0, rtol=0, atol=0)


def test_memory_model_keeps_activations_only_for_trained_layers():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4)
    full = estimate_memory(config, Recipe(method="full", micro_batch=4, seq_len=256))
    top2 = estimate_memory(config, Recipe(method="freeze", micro_batch=4, seq_len=256, extra={"method_options": {"layers": 2}}))
    assert top2.sizes["activations"] < full.sizes["activations"] / 2
    assert top2.terms["optimizer_states"] < full.terms["optimizer_states"] / 3


def test_resume_is_exact(tmp_path, monkeypatch):
    from helpers import interrupted_and_uninterrupted

    chat = write_chat_jsonl(tmp_path / "chat.jsonl")
    straight, resumed = interrupted_and_uninterrupted(tmp_path, chat, monkeypatch, method={"name": "freeze", "layers": 1},
                                                      budget={"steps": 8}, checkpoint={"every": 0.5}, optim={"lr": 1e-2})
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
