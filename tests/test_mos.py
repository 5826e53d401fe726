"""MoS: adapters assembled from a shared pool of shards plus private ones; the parameter
formula, the assembly, training, merged export, exact resume and the planner's count."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.checkpoint import list_checkpoints
from budgetune.errors import ConfigError
from budgetune.evaluate import load_trained
from budgetune.export import export
from budgetune.methods import METHODS
from budgetune.models import count_parameters

from helpers import interrupted_and_uninterrupted, write_chat_jsonl


def small_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                         num_attention_heads=4, num_key_value_heads=2))


def test_parameter_count_is_a_lora_of_the_equivalent_rank():
    model = small_llama()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers.0." in n]
    mos = METHODS["mos"].prepare(model, METHODS["mos"].Options(r=16, pool_rank=1, private=1, shards=4))
    trainable, _ = count_parameters(mos)
    per_layer_lora_r1 = sum(m.in_features + m.out_features for m in linears)
    assert trainable == (1 + 1) * 4 * per_layer_lora_r1  # (pool_rank + private) × layers × (in + out)
    lora_trainable, _ = count_parameters(METHODS["lora"].prepare(small_llama(), METHODS["lora"].Options(r=16)))
    assert lora_trainable == 8 * trainable  # rank 16 adapters at the parameters of a rank-2 LoRA


def test_adapters_are_assembled_from_shared_and_private_shards():
    base = small_llama()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    method = METHODS["mos"]
    model = method.prepare(small_llama(), method.Options(r=6, pool_rank=2, private=2, shards=4, alpha=12))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # B = 0: starts as the base model
        pool = q0.pool[0]
        assert pool is q1.pool[0] and pool["A"].shape == (2 * 4 * 4, 16)  # pool_rank × layers vectors × shards, 64/4 long
        for p in (pool["B"], q0.private_b, q1.private_b):
            p.normal_()
        a, b = q0.factors()
        assert a.shape == (6, 64) and b.shape == (64, 6)
        torch.testing.assert_close(a[:2], q0.private_a.reshape(2, 64))  # private vectors first
        torch.testing.assert_close(a[2:], pool["A"][q0.index_a].reshape(4, 64))  # the rest: routed pool shards
        assert len(set(q0.index_a.tolist())) == len(q0.index_a)  # distinct shards while the pool has enough
        assert not torch.equal(q0.index_a, q0.index_b) and not torch.equal(q0.index_a, q1.index_a)  # dissociated, per layer
        torch.testing.assert_close(q0.delta(), 2.0 * b @ a)
        assert torch.linalg.matrix_rank(q0.delta()) <= 6
        x = torch.randn(3, 64)
        torch.testing.assert_close(q0(x), x @ (q0.base.weight + q0.delta()).T, rtol=1e-4, atol=1e-5)
        shared = q0.index_a[0]  # a shard that layer 0 uses: changing it changes layer 0's delta
        before = q0.delta().clone()
        pool["A"][shared] += 1
        assert not torch.allclose(q0.delta(), before)


def test_shards_must_divide_the_features():
    method = METHODS["mos"]
    with pytest.raises(ConfigError, match="method.shards"):
        method.prepare(small_llama(), method.Options(shards=3))


@pytest.mark.slow  # end-to-end: three training runs
def test_trains_exports_merged_and_resumes_exactly(tmp_path, monkeypatch):
    import budgetune

    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    straight, resumed = interrupted_and_uninterrupted(tmp_path, data, monkeypatch, method={"name": "mos", "r": 8, "shards": 2},
                                                      optim={"lr": 1e-2}, budget={"steps": 10}, checkpoint={"every": 0.5})
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    assert straight and all(k.startswith("mos_pools.") or ".private_" in k for k in straight)  # only the adapter trains
    run = tmp_path / "a" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["trainable_parameters"] == sum(t.numel() for t in straight.values())
    assert summary["predicted"] is not None  # the planner counts it on a meta-device model
    model, tokenizer, _ = load_trained(run)  # run/model is a plain transformers folder
    assert not any("mos" in n or "private" in n for n, _ in model.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    ids = torch.tensor([tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits)
    assert summary["eval_loss_after"] == pytest.approx(budgetune.evaluate(run)["eval_loss"], rel=1e-4)
    ckpt = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    assert set(ckpt) == set(straight)
