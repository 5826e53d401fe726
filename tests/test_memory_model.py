"""The memory model (plan/memory.py): its terms against hand-computed cases, and one real measurement."""

import pytest
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

from budgetune.plan.memory import estimate_memory, layer_activation_elements, architecture
from budgetune.plan.recipe import Recipe

H, I, L, NH, NKV, V = 64, 176, 2, 4, 2, 300
HD = H // NH


def tiny_llama(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                       num_key_value_heads=NKV, vocab_size=V, **kw)


def llama_parameters() -> int:
    attn = H * H + 2 * H * NKV * HD + H * H  # q, k, v, o (no biases)
    mlp = 3 * H * I
    layer = attn + mlp + 2 * H  # two RMSNorm gains
    return V * H + L * layer + H + V * H  # embedding, layers, final norm, untied lm_head


def test_weights_gradients_and_adam_states_by_hand():
    est = estimate_memory(tiny_llama(), Recipe(micro_batch=2, seq_len=32), "cpu", overhead_bytes=0)
    n = llama_parameters()
    assert est.parameters == est.trainable == n
    assert est.terms["weights"] == 4 * n  # fp32
    assert est.terms["optimizer_states"] == 8 * n  # AdamW: two fp32 moments
    assert est.sizes["gradients"] == 4 * n
    assert est.terms["overhead"] == 0
    assert est.total == sum(est.terms.values())
    sgd = estimate_memory(tiny_llama(), Recipe(micro_batch=2, seq_len=32, optimizer="sgd"), "cpu")
    assert sgd.terms["optimizer_states"] == 4 * n  # one momentum buffer


def test_parameter_count_matches_real_models():
    for config in (tiny_llama(), tiny_llama(tie_word_embeddings=True),
                   Qwen2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                               num_key_value_heads=NKV, vocab_size=V),
                   GPTNeoXConfig(hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L, num_attention_heads=NH,
                                 vocab_size=V)):
        model = AutoModelForCausalLM.from_config(config)
        real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert architecture(config).parameters == real, config.model_type


@pytest.mark.parametrize("make_config", [
    tiny_llama,
    lambda: Qwen2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                        num_key_value_heads=NKV, vocab_size=V),
    lambda: GPTNeoXConfig(hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L, num_attention_heads=NH, vocab_size=V),
])
@pytest.mark.parametrize("r", [4, 16])
def test_lora_trainable_count_matches_peft(make_config, r):
    from budgetune.methods import get_method
    from budgetune.methods.lora import LoraOptions

    config = make_config()
    est = estimate_memory(config, Recipe(method="lora", lora_r=r, micro_batch=1, seq_len=16), "cpu")
    peft_model = get_method("lora").prepare(AutoModelForCausalLM.from_config(config), LoraOptions(r=r))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert est.trainable == trainable
    assert est.terms["optimizer_states"] == 8 * trainable
    # base fp32 + fp32 adapter on CPU
    assert est.terms["weights"] == 4 * (architecture(config).parameters + trainable)


def test_named_lora_targets():
    est = estimate_memory(tiny_llama(), Recipe(method="lora", lora_r=8, lora_targets=("q_proj", "v_proj")), "cpu")
    assert est.trainable == L * 8 * ((H + H) + (H + NKV * HD))


def test_activations_per_layer_by_hand_and_checkpointing_ratio():
    b, t = 2, 64
    tokens = b * t
    full = estimate_memory(tiny_llama(), Recipe(micro_batch=b, seq_len=t), "cpu")
    ckpt = estimate_memory(tiny_llama(), Recipe(micro_batch=b, seq_len=t, gradient_checkpointing=True), "cpu")
    # llama layer: 6H + q, k, v, out (all heads: K/V repeated under a mask) + log-sum-exp + 4I, fp32
    per_layer = tokens * (6 * H + 4 * NH * HD + NH + 4 * I) * 4
    assert layer_activation_elements(architecture(tiny_llama()), masked=True) * tokens * 4 == per_layer
    shared = 2 * tokens * HD * 4 + tokens * 3 * H * 4  # rotary cos/sin, final norm
    assert full.sizes["activations"] == L * per_layer + shared
    # checkpointing: one hidden state per layer boundary + one layer recomputed
    assert ckpt.sizes["activations"] == L * tokens * H * 4 + per_layer + shared
    saved = full.sizes["activations"] - shared
    assert (ckpt.sizes["activations"] - shared) / saved == pytest.approx((L * H * 4 + per_layer / tokens) / (L * per_layer / tokens))
    # the per-layer float masks SDPA saves go away under checkpointing (one bool mask remains)
    assert full.sizes["attention_mask"] == L * b * t * t * 4
    assert ckpt.sizes["attention_mask"] == b * t * t


def test_logits_loss_buffers():
    est = estimate_memory(tiny_llama(), Recipe(micro_batch=3, seq_len=40), "cpu")
    assert est.sizes["logits_loss"] == 3 * 3 * 40 * V * 4  # logits, flat copy, log-softmax (fp32)


def test_peak_is_forward_end_or_later_and_not_a_sum_of_everything():
    est = estimate_memory(tiny_llama(), Recipe(micro_batch=8, seq_len=256), "cpu", overhead_bytes=0)
    everything = sum(est.sizes.values())
    assert est.total < everything + est.terms["workspace"] + est.terms["runtime"]
    assert est.peak_at == "loss (end of forward)"
    assert est.terms["gradients"] == 0  # freed by zero_grad(set_to_none=True), not yet recomputed
    accum = estimate_memory(tiny_llama(), Recipe(micro_batch=8, seq_len=256, grad_accum=2), "cpu", overhead_bytes=0)
    assert accum.terms["gradients"] == accum.sizes["gradients"]  # kept across micro-batches


def test_zero_stages_divide_by_world_size():
    config, n = tiny_llama(), llama_parameters()
    base = Recipe(micro_batch=2, seq_len=32)
    z1 = estimate_memory(config, base.with_(world_size=4, zero_stage=1), "cuda")
    z2 = estimate_memory(config, base.with_(world_size=4, zero_stage=2), "cuda")
    z3 = estimate_memory(config, base.with_(world_size=4, zero_stage=3), "cuda")
    assert z1.terms["optimizer_states"] == 8 * n // 4 and z1.sizes["gradients"] == 4 * n
    assert z2.sizes["gradients"] == 4 * n // 4
    assert z3.terms["weights"] == 4 * n // 4
    cpu = estimate_memory(config, base.with_(world_size=4, zero_stage=3), "cpu")
    one = estimate_memory(config, base, "cpu")
    assert cpu.terms["weights"] * 4 == one.terms["weights"]


def test_bf16_frozen_base_on_cuda_halves_the_base_weights():
    recipe = Recipe(method="lora", micro_batch=2, seq_len=32, precision="bf16-mixed")
    cpu = estimate_memory(tiny_llama(), recipe, "cpu")
    cuda = estimate_memory(tiny_llama(), recipe, "cuda")
    adapter = 4 * cpu.trainable
    assert cuda.terms["weights"] - adapter == (cpu.terms["weights"] - adapter) // 2


def test_default_overhead_and_describe():
    est = estimate_memory(tiny_llama(), Recipe(micro_batch=2, seq_len=32), "cpu")
    assert est.terms["overhead"] == 400 * 2**20
    text = est.describe()
    for name in ("weights", "gradients", "optimizer_states", "activations", "logits_loss", "attention_mask", "overhead", "total"):
        assert name in text
    assert "MiB" in text


def test_measured_step_memory_agrees_with_the_prediction():
    """One real two-step measurement in a subprocess; loose tolerance so CI stays stable."""
    from budgetune.plan.measure import measure_step_memory

    config = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4000)
    recipe = Recipe(micro_batch=4, seq_len=256)
    measured = measure_step_memory(config, recipe)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    predicted = estimate_memory(LlamaConfig(**kwargs), recipe, "cpu", overhead_bytes=measured["baseline_bytes"])
    assert measured["baseline_bytes"] > 100 * 2**20  # torch + transformers are loaded before the model
    assert predicted.step_bytes == pytest.approx(measured["peak_bytes"], rel=0.25)
