"""The planner with quantised bases: weight bytes by hand and against bitsandbytes' tensors,
the dequantisation workspace, and the search proposing QLoRA when LoRA does not fit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import load_config
from budgetune.plan.memory import architecture, estimate_memory, quantized_weight_bytes
from budgetune.plan.recipe import Recipe
from budgetune.plan.search import apply_plan, candidate_recipes, make_plan

from helpers import tiny_config, write_text_corpus

# llama-test: hidden 64, intermediate 176, 2 layers, 4 heads / 2 KV heads (head_dim 16)
LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 176), (64, 176), (176, 64)]  # q k v o gate up down (in, out)


def config(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, **kw)


def test_quantised_weight_bytes_by_hand():
    arch = architecture(config())
    n = 2 * sum(i * o for i, o in LINEARS)
    assert n == 92160
    # NF4 + double quantisation, per linear: n/2 bytes of codes, one 8-bit absmax per 64-block,
    # an fp32 absmax per 256 of those, the 256-entry fp32 code and offset of the second level,
    # and the 16-entry fp32 code of the 4-bit type
    blocks = [i * o // 64 for i, o in LINEARS]  # 64 32 32 64 176 176 176
    per_layer = sum(i * o // 2 for i, o in LINEARS) + sum(blocks) + 7 * (4 * 1 + 1024 + 4 + 64)
    assert quantized_weight_bytes(arch, "nf4", True) == (2 * per_layer, n)
    # without double quantisation: an fp32 absmax per 64-block
    assert quantized_weight_bytes(arch, "fp4", False) == (2 * (sum(i * o // 2 for i, o in LINEARS) + 4 * sum(blocks) + 7 * 64), n)
    # int8: a byte per weight and an fp32 scale per output row
    assert quantized_weight_bytes(arch, "int8") == (n + 2 * 4 * sum(o for _, o in LINEARS), n)
    # ≈ 0.5 B/param + constants (the fixed per-tensor tables weigh a lot on a model this small)
    big = architecture(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8))
    nbytes, nq = quantized_weight_bytes(big, "nf4", True)
    assert nbytes / nq == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=2e-3)
    nbytes, nq = quantized_weight_bytes(big, "nf4", False)
    assert nbytes / nq == pytest.approx(0.5 + 4 / 64, rel=2e-3)


@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("fp4", False), ("int8", True)])
def test_quantised_weight_bytes_match_bitsandbytes(kind, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from budgetune.quantize import bnb_config, quantize_model

    torch.manual_seed(0)
    model = quantize_model(AutoModelForCausalLM.from_config(config()), bnb_config(kind, torch.device("cpu"), double_quant), torch.float32)
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            tensors = [m.weight, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        elif isinstance(m, bnb.nn.Linear8bitLt):
            tensors = [m.weight, m.weight.SCB]
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    assert quantized_weight_bytes(architecture(config()), kind, double_quant)[0] == total


def test_qlora_weights_term_and_dequantisation_workspace():
    arch = architecture(config())
    lora = estimate_memory(config(), Recipe(method="lora", lora_r=8, micro_batch=2, seq_len=32), "cpu", overhead_bytes=0)
    qlora = estimate_memory(config(), Recipe(method="lora", lora_r=8, micro_batch=2, seq_len=32, quantize="nf4"), "cpu", overhead_bytes=0)
    q_bytes, q_params = quantized_weight_bytes(arch, "nf4")
    assert lora.terms["weights"] - qlora.terms["weights"] == 4 * q_params - q_bytes  # fp32 on the CPU → 4 bits
    assert qlora.trainable == lora.trainable and qlora.terms["optimizer_states"] == lora.terms["optimizer_states"]
    # backward dequantises one weight at a time: the largest linear (176 × 64) in fp32
    small = estimate_memory(config(), Recipe(method="lora", lora_r=8, micro_batch=1, seq_len=8, quantize="nf4"), "cpu", overhead_bytes=0)
    assert small.peak_at.startswith("backward")
    # a layer's backward temporaries (8 tokens × max(I, 3H) fp32) + the dequantised weight
    assert small.terms["workspace"] == 8 * max(176, 3 * 64) * 4 + 4 * 176 * 64
    # on a GPU the float parts of the frozen base are bf16, and so is the dequantised weight
    cuda = estimate_memory(config(), Recipe(method="lora", lora_r=8, micro_batch=2, seq_len=32, quantize="nf4",
                                            precision="bf16-mixed"), "cuda", overhead_bytes=0)
    assert cuda.terms["weights"] == 2 * (arch.parameters - q_params) + q_bytes + 4 * cuda.trainable
    # full fine-tuning has no quantised variant: the term is ignored for it
    full = estimate_memory(config(), Recipe(method="full", micro_batch=2, seq_len=32, quantize="nf4"), "cpu", overhead_bytes=0)
    assert full.terms["weights"] == 4 * arch.parameters


def test_search_proposes_qlora_only_when_lora_does_not_fit(tmp_path):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    arch = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8}
    base = tiny_config(tmp_path, corpus, model={"init": "scratch", "preset": "llama-test", "arch": arch},
                       method={"name": "lora"}, train={"micro_batch": 1}, budget={"steps": 3})
    base["data"]["seq_len"] = 32
    roomy = make_plan(load_config(base, {"budget": {"memory": "64GB"}}), probe_steps=0, log=lambda m: None)
    assert roomy.best.recipe.quantize is None  # an unquantised base wins when it fits
    sizes = {q: min(c.memory.total for c in roomy.candidates if c.recipe.quantize == q) for q in (None, "nf4")}
    assert sizes["nf4"] < sizes[None]
    between = f"{(sizes['nf4'] + sizes[None]) // 2}B"
    tight_cfg = load_config(base, {"budget": {"memory": between}})
    tight = make_plan(tight_cfg, probe_steps=0, log=lambda m: None)
    assert tight.best is not None and tight.best.recipe.quantize == "nf4"
    assert all(not c.fits for c in tight.candidates if c.recipe.quantize is None)
    assert apply_plan(tight_cfg, tight).model.quantize == "nf4"
    # the user pinned an unquantised base: no QLoRA candidate, nothing fits
    pinned = make_plan(load_config(base, {"budget": {"memory": between}, "model": {"quantize": None}}), probe_steps=0, log=lambda m: None)
    assert pinned.best is None and all(c.recipe.quantize is None for c in pinned.candidates)
    # a method that cannot run on a quantised base gets no QLoRA candidate
    full = load_config(base, {"method": {"name": "full"}})
    assert all(r.quantize is None for r in candidate_recipes(full, torch.device("cpu")))


@pytest.mark.slow
def test_measured_qlora_step_memory_agrees_with_the_prediction():
    """A real two-step measurement of LoRA on an NF4 base in a fresh process (loose tolerance, as for LoRA)."""
    pytest.importorskip("bitsandbytes")
    from budgetune.plan.measure import measure_step_memory

    cfg = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=4000)
    recipe = Recipe(method="lora", lora_r=8, micro_batch=4, seq_len=256, quantize="nf4", extra={"double_quant": True})
    measured = measure_step_memory(cfg, recipe)
    predicted = estimate_memory(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}), recipe, "cpu",
                                overhead_bytes=measured["baseline_bytes"])
    assert predicted.step_bytes == pytest.approx(measured["peak_bytes"], rel=0.25)
