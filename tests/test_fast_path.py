"""The GPU fast path's CPU-testable parts: what is picked where, pure-bf16 with Kahan-compensated
AdamW, the memory model's terms for each choice, the fused-loss hook, torch.compile of the layers."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from budgetune import attention, fastpath
from budgetune.config import OptimConfig, load_config
from budgetune.errors import ConfigError
from budgetune.lm_loss import token_losses
from budgetune.optim import build_optimizer
from budgetune.plan.memory import estimate_memory, liger_loss_bytes, architecture
from budgetune.plan.recipe import Recipe


def cfg_with(**sections):
    d = {"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x.txt"]}, "budget": {"steps": 10}}
    for key, value in sections.items():
        d.setdefault(key, {}).update(value)
    return load_config(d)


# --- attention -------------------------------------------------------------------------------------


def test_auto_attention_follows_the_device(monkeypatch):
    assert attention.resolve("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention.resolve("auto", "cuda") == "flash_attention_2"
    assert attention.resolve("auto", "cpu") == "sdpa"  # flash-attn is CUDA-only
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert attention.resolve("auto", "cuda") == "flex_attention"
    monkeypatch.setattr(attention, "flex_attention_available", lambda: False)
    assert attention.resolve("auto", "cuda") == "sdpa"


def test_attention_choices_that_cannot_train_here_are_refused(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU and the flash_attn"):
        attention.resolve("flash_attention_2", "cuda")
    with pytest.raises(ConfigError, match="no backward pass on the CPU"):
        attention.resolve("flex_attention", "cpu")
    assert attention.resolve("flex_attention", "cpu", training=False) == "flex_attention"
    assert attention.resolve("eager", "cpu") == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        cfg_with(model={"attn_implementation": "flash"})


def test_the_default_is_auto_and_the_model_gets_the_resolved_name():
    from budgetune.models import load_model

    cfg = cfg_with()
    assert cfg.model.attn_implementation == "auto"
    assert fastpath.use_liger(cfg, "cpu") is False  # auto: never on the CPU

    class Tok:  # the few things load_model asks of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 97

    model = load_model(cfg, Tok(), torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.get_output_embeddings(), "budgetune_fused_loss")


# --- Liger and the fused-loss hook ------------------------------------------------------------------


def test_liger_true_without_cuda_is_a_config_error():
    cfg = cfg_with(model={"liger": True})
    with pytest.raises(ConfigError, match="model.liger"):
        fastpath.use_liger(cfg, "cpu")
    with pytest.raises(ConfigError, match="model.liger"):
        cfg_with(model={"liger": "yes"})


def test_a_fused_loss_on_the_head_replaces_head_and_cross_entropy():
    """token_losses hands the final hidden states, the head's weight and the targets to the attached
    loss (Liger's on CUDA); a reference in plain torch must give the plain path's loss and gradients."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, 97, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    plain, n_plain = token_losses(model, dict(batch))
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []

    def reference(weight, hidden, targets, bias):
        calls.append((tuple(hidden.shape), tuple(targets.shape)))
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias).float(), targets,
                                                 ignore_index=-100, reduction="sum")

    fastpath.attach_fused_loss(model, reference)
    assert "budgetune_fused_loss" not in dict(model.named_modules())  # not a submodule: the state dict is unchanged
    fused, n_fused = token_losses(model, dict(batch))
    fused.backward()
    assert calls == [((2 * 11, 32), (2 * 11,))]
    assert int(n_fused) == int(n_plain)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


# --- precision -----------------------------------------------------------------------------------


def test_precision_follows_the_device_and_pure_bf16_is_checked():
    assert fastpath.resolve_precision(cfg_with(), "cpu") == "fp32"
    assert fastpath.resolve_precision(cfg_with(), "cuda") == "bf16-mixed"  # planning for a GPU from here
    assert fastpath.resolve_precision(cfg_with(train={"precision": "pure-bf16"}), "cpu") == "pure-bf16"
    with pytest.raises(ConfigError, match="bf16-mixed"):
        fastpath.resolve_precision(cfg_with(train={"precision": "bf16-mixed"}), "cpu")
    with pytest.raises(ConfigError, match="optim.name adamw"):
        cfg_with(train={"precision": "pure-bf16"}, optim={"name": "galore"})
    with pytest.raises(ConfigError, match="model.dtype"):
        cfg_with(train={"precision": "pure-bf16"}, model={"dtype": "float32"})


def test_pure_bf16_loads_bf16_weights_and_gets_the_kahan_adamw():
    from budgetune.models import weights_dtype

    cfg = cfg_with(train={"precision": "pure-bf16"})
    assert weights_dtype(cfg, torch.device("cpu"), frozen_base=False) == torch.bfloat16
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    assert type(opt).__module__.startswith("optimi")
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert {k: v.dtype for k, v in state.items() if torch.is_tensor(v) and v.ndim} == {
        "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "kahan_comp": torch.bfloat16}
    fp32 = build_optimizer(torch.nn.Linear(8, 8), OptimConfig(lr=1e-3))
    assert isinstance(fp32, torch.optim.AdamW)  # fp32 weights keep torch's AdamW (fused on CPU and CUDA)


def test_fp32_weights_on_the_cpu_get_the_fused_adamw_and_it_is_adamw():
    """The fused kernel (in place, no per-tensor temporaries) steps exactly as torch's reference AdamW,
    with the decayed and undecayed groups, and its state resumes into a fresh optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta2=0.95)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2  # matrices decayed, vectors not
    reference = torch.optim.AdamW([{**g, "params": list(twin_g)} for g, twin_g in zip(
        fused.param_groups, [[p for p in twin.parameters() if p.ndim >= 2], [p for p in twin.parameters() if p.ndim < 2]])],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    x = torch.randn(64, 16)
    for _ in range(5):
        for m, opt in ((model, fused), (twin, reference)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = build_optimizer(model, cfg)
    resumed.load_state_dict(fused.state_dict())
    assert all(torch.equal(resumed.state[p]["exp_avg_sq"], fused.state[p]["exp_avg_sq"]) for p in model.parameters())


def _track(kind: str, steps: int = 400, lr: float = 1e-4) -> torch.Tensor:
    """A 128×128 weight pulled towards a target under noisy gradients: the fp32 reference, bf16
    weights with torch's AdamW (each update rounded to bf16), or with the Kahan-compensated AdamW."""
    torch.manual_seed(0)
    w0, target = torch.randn(128, 128) * 0.02, torch.randn(128, 128) * 0.02
    p = torch.nn.Parameter(w0.clone() if kind == "fp32" else w0.to(torch.bfloat16))
    cfg = OptimConfig(lr=lr, beta2=0.95)
    if kind == "naive":
        opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        opt = build_optimizer(torch.nn.ParameterList([p]), cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = ((p.detach().float() - target) + 0.01 * torch.randn(128, 128, generator=g)).to(p.dtype)
        opt.step()
        opt.zero_grad()
    return p.detach().float()


def test_kahan_bf16_tracks_fp32_far_better_than_naive_bf16():
    ref = _track("fp32")
    naive = (_track("naive") - ref).norm() / ref.norm()
    kahan = (_track("kahan") - ref).norm() / ref.norm()
    assert kahan < 0.02  # measured 0.003
    assert naive > 10 * kahan  # measured 0.55: updates of lr 1e-4 mostly round away in bf16


def test_kahan_adamw_is_adamw_in_fp32():
    """On fp32 weights torch-optimi's AdamW is torch's AdamW (same weight-decay convention)."""
    import optimi

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 16))
    b = torch.nn.Parameter(a.detach().clone())
    ta = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tb = optimi.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kahan_sum=True)
    for i in range(5):
        g = torch.randn(16, 16)
        a.grad, b.grad = g.clone(), g.clone()
        ta.step()
        tb.step()
    assert torch.allclose(a, b, atol=1e-5)


# --- the memory model's terms ----------------------------------------------------------------------

QWEN = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, tie_word_embeddings=True)


def test_memory_pure_bf16_halves_weights_gradients_and_states():
    n = architecture(QWEN).parameters
    mixed = estimate_memory(QWEN, Recipe(method="full", micro_batch=1, seq_len=2048, precision="bf16-mixed"), "cuda")
    pure = estimate_memory(QWEN, Recipe(method="full", micro_batch=1, seq_len=2048, precision="pure-bf16"), "cuda")
    assert mixed.terms["weights"] == 4 * n + 2 * n  # fp32 master + autocast's bf16 copies
    assert pure.terms["weights"] == 2 * n
    assert mixed.terms["optimizer_states"] == 8 * n
    assert pure.terms["optimizer_states"] == 6 * n  # two bf16 moments + the bf16 Kahan buffer
    assert pure.sizes["gradients"] == 2 * n and mixed.sizes["gradients"] == 4 * n
    assert pure.sizes["activations"] == mixed.sizes["activations"]  # bf16 either way on CUDA
    cpu = estimate_memory(QWEN, Recipe(method="full", micro_batch=1, seq_len=512, precision="pure-bf16"), "cpu")
    assert cpu.terms["weights"] == 2 * n


def test_memory_mask_free_attention_has_no_mask_and_unrepeated_kv():
    sdpa = estimate_memory(QWEN, Recipe(method="full", micro_batch=2, seq_len=2048, precision="bf16-mixed"), "cuda")
    for name in ("flash_attention_2", "flex_attention"):
        free = estimate_memory(QWEN, Recipe(method="full", micro_batch=2, seq_len=2048, precision="bf16-mixed", attention=name), "cuda")
        assert free.sizes["attention_mask"] == 0 and sdpa.sizes["attention_mask"] >= 24 * 2 * 2048**2 * 2
        arch = architecture(QWEN)
        kv_saved = 2 * (arch.heads - arch.kv_heads) * arch.head_dim  # K and V no longer repeated to every head
        assert sdpa.sizes["activations"] - free.sizes["activations"] == 24 * 2 * 2048 * kv_saved * 2


def test_memory_liger_fused_loss_has_no_full_logits():
    arch = architecture(QWEN)
    chunked = estimate_memory(QWEN, Recipe(method="full", micro_batch=4, seq_len=2048, precision="bf16-mixed"), "cuda")
    liger = estimate_memory(QWEN, Recipe(method="full", micro_batch=4, seq_len=2048, precision="bf16-mixed", fused_loss=True), "cuda")
    tokens = 4 * 2048
    assert liger.sizes["logits_loss"] == liger_loss_bytes(arch, tokens, 2)
    # chunks of next_pow2(tokens / ⌈V / H⌉) = 64 tokens: the [tokens, H] and [V, H] gradients + one chunk's fp32 logits and grad
    assert liger_loss_bytes(arch, tokens, 2) == tokens * 896 * 2 + 151936 * 896 * 2 + 2 * 64 * 151936 * 4
    assert liger.sizes["logits_loss"] < 3 * tokens * arch.vocab * 4 / 10  # far below full fp32 logits
    assert chunked.sizes["logits_loss"] != liger.sizes["logits_loss"]


def test_the_planner_recipe_carries_the_choices():
    from budgetune.plan.search import candidate_recipes, recipe_from_config

    cfg = cfg_with(train={"precision": "pure-bf16"})
    r = recipe_from_config(cfg, torch.device("cpu"))
    assert (r.precision, r.attention, r.fused_loss) == ("pure-bf16", "sdpa", False)
    assert all(c.precision == "pure-bf16" and c.attention == "sdpa" for c in candidate_recipes(cfg, torch.device("cpu")))


# --- torch.compile -------------------------------------------------------------------------------


def test_compile_auto_only_on_a_gpu_with_time_to_pay_for_it():
    assert fastpath.use_compile(cfg_with(train={"compile": "auto"}), "cpu") is False
    assert fastpath.use_compile(cfg_with(train={"compile": "auto"}), "cuda") is True
    assert fastpath.use_compile(cfg_with(train={"compile": "auto"}, budget={"time": "5m"}), "cuda") is False
    assert fastpath.use_compile(cfg_with(train={"compile": True}), "cpu") is True
    assert fastpath.use_compile(cfg_with(), "cuda") is False  # the default is off until the GPU suite says it pays


@pytest.mark.skipif(importlib.util.find_spec("torch._inductor") is None, reason="no inductor")
def test_compiled_layers_match_eager_loss_and_gradients():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    eager = AutoModelForCausalLM.from_config(config)
    compiled = AutoModelForCausalLM.from_config(config)
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    assert fastpath.compile_layers(compiled) == 2
    assert list(compiled.state_dict()) == names  # in place: checkpoints and saved models keep their keys
    ids = torch.randint(1, 97, (2, 16))
    pos = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)  # two packed examples per row
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    le, _ = token_losses(eager, dict(batch))
    lc, _ = token_losses(compiled, dict(batch))
    le.backward()
    lc.backward()
    assert lc.item() == pytest.approx(le.item(), rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.slow
def test_a_pure_bf16_run_trains_checkpoints_and_says_what_it_picked(tmp_path, capsys):
    import budgetune
    from helpers import tiny_config, write_text_corpus

    cfg = tiny_config(tmp_path, write_text_corpus(tmp_path / "corpus"), train={"precision": "pure-bf16", "deterministic": False})
    summary = budgetune.train(cfg)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    out = " ".join(capsys.readouterr().out.split())  # the console may wrap long lines
    assert "fast path: attention: SDPA with a block-diagonal [T, T] mask; precision pure-bf16" in out
    state = torch.load(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"].values()))
    assert first["kahan_comp"].dtype == torch.bfloat16 and first["exp_avg"].dtype == torch.bfloat16
