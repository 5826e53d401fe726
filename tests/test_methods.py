"""The LoRA family through peft: each variant trains, changes only its adapter, has the
trainable-parameter count of its formula, resumes, and exports to a merged model."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from budgetune.checkpoint import list_checkpoints
from budgetune.evaluate import load_trained
from budgetune.export import export
from budgetune.methods import METHODS
from budgetune.models import count_parameters
from budgetune.optim import build_optimizer, param_groups
from budgetune.plan.memory import architecture, trainable_parameters
from budgetune.plan.recipe import Recipe
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl

LORA_FAMILY = ["lora", "rslora", "dora", "loraplus", "pissa"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl")


@pytest.mark.parametrize("name", LORA_FAMILY)
def test_variant_trains_only_its_adapter_and_exports(tmp_path, chat, name):
    summary = train(tiny_config(tmp_path, chat, method={"name": name, "r": 4}, budget={"steps": 8}, optim={"lr": 1e-2},
                                checkpoint={"every": 0.5}), quiet=True)
    run = tmp_path / "run"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]

    # the trainable-parameter count matches the formula the planner uses
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    recipe = Recipe(method=name, lora_r=4)
    assert summary["trainable_parameters"] == trainable_parameters(architecture(base.config), recipe)

    # only adapter tensors were trained; the frozen base inside the trained model is unchanged
    trained, tokenizer, _ = load_trained(run)
    for n, p in trained.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p, base.state_dict()[key], rtol=0, atol=0)
    ckpt = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)

    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_pissa_starts_at_the_base_model_and_saves_a_lora_of_the_original_weights(tmp_path):
    """PiSSA moves the top singular directions into A, B (W = W_res + BA, so the untrained
    model is the base); the saved adapter is the equivalent plain LoRA on the *original* W."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    original = copy.deepcopy(model)  # PiSSA rewrites W into the residual in place
    method = METHODS["pissa"]
    peft_model = method.prepare(model, method.Options(r=4, init="pissa"))
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.abs().sum() > 0  # unlike LoRA, B starts non-zero
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)

    # "train" it (perturb A and B), save, and load the result on a fresh copy of the original model
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = peft_model(input_ids=ids).logits
    method.save_pretrained(peft_model, tmp_path / "adapter")
    import json

    from peft import PeftModel

    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["init_lora_weights"] is True  # converted: a plain rank-2r LoRA
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_dora_adds_a_magnitude_per_output_feature(tmp_path, chat):
    lora = train(tiny_config(tmp_path / "a", chat, method={"name": "lora", "r": 4}, budget={"steps": 1}), quiet=True)
    dora = train(tiny_config(tmp_path / "b", chat, method={"name": "dora", "r": 4}, budget={"steps": 1}), quiet=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "base")
    out_features = sum(m.out_features for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    assert dora["trainable_parameters"] - lora["trainable_parameters"] == out_features


def test_rslora_scales_by_alpha_over_sqrt_r():
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    method = METHODS["rslora"]
    peft_model = method.prepare(model, method.Options(r=16, alpha=8))
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    plain = METHODS["lora"].prepare(AutoModelForCausalLM.from_config(model.config), METHODS["lora"].Options(r=16, alpha=8))
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 16)


def test_loraplus_gives_b_a_larger_learning_rate():
    from transformers import LlamaConfig

    from budgetune.config import OptimConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    method = METHODS["loraplus"]
    opts = method.Options()
    model = method.prepare(model, opts)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), method.lr_scales(opts))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        kinds = {("lora_B" in names[id(p)]) for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr_scale"] == (16.0 if kinds == {True} else 1.0)
    trainable, _ = count_parameters(model)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable


def test_param_groups_do_not_decay_vectors():
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    groups = param_groups([("w", w), ("b", b)], weight_decay=0.1)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(w)] == 0.1 and decay[id(b)] == 0.0


PEFT_TUNERS = {"ia3": "ia3_l", "vera": "vera_lambda", "miss": "miss_block"}


@pytest.mark.parametrize("name", sorted(PEFT_TUNERS))
def test_other_peft_adapters(tmp_path, chat, name):
    summary = train(tiny_config(tmp_path, chat, method={"name": name}, budget={"steps": 8}, optim={"lr": 3e-2},
                                checkpoint={"every": 0.5}), quiet=True)
    run = tmp_path / "run"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 3
    assert summary["predicted"] is not None  # the planner knows the method (counted on a meta model)
    ckpt = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    assert ckpt and all(PEFT_TUNERS[name] in k for k in ckpt), sorted(ckpt)[:3]
    assert sum(t.numel() for t in ckpt.values()) == summary["trainable_parameters"]

    trained, tokenizer, _ = load_trained(run)
    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
