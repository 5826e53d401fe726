"""FP8-state AdamW (COAT-style dynamic range expansion): quantisation error bound, update
fidelity against fp32 AdamW, state bytes, checkpoint round trip and training."""

import pytest
import torch

from budgetune.optim.fp8_adamw import FP8AdamW, dequantize, quantize, state_bytes

from helpers import interrupted_and_uninterrupted, write_text_corpus


@pytest.mark.parametrize("spread", [0.1, 1.0, 3.0])
def test_quantise_error_bound(spread):
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.exp(torch.randn(4096) * spread)
    codes, scale, k = quantize(x, 256)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (16, 256)
    y = dequantize(codes, scale, k, x)
    bound = ((1 + 2**-4) ** (1 / k) - 1).repeat_interleave(256)
    rel = (y - x).abs() / x.abs()
    assert torch.all(rel <= bound * 1.01 + 1e-6)
    assert torch.equal(torch.sign(y), torch.sign(x))


def test_range_expansion_beats_plain_scaling_on_wide_groups():
    """Without expansion (k = 1), small values of a wide-range group underflow FP8."""
    torch.manual_seed(0)
    x = torch.exp(torch.randn(256) * 4)  # spans ~e^±12
    codes, scale, k = quantize(x, 256)
    expanded_err = ((dequantize(codes, scale, k, x) - x).abs() / x).max()
    plain = (x / (x.max() / 448)).to(torch.float8_e4m3fn).float() * (x.max() / 448)
    plain_err = ((plain - x).abs() / x).max()
    assert expanded_err < 0.2 < plain_err


def test_zero_and_padding_are_exact():
    x = torch.zeros(300)
    x[7] = 3.0
    y = dequantize(*quantize(x, 256), like=x)
    assert torch.equal(y == 0, x == 0) and y[7] == pytest.approx(3.0, rel=0.07)


def _quadratic_run(opt_cls, steps=50, **kw):
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    w = torch.nn.Parameter(torch.zeros(64, 64))
    opt = opt_cls([w], lr=1e-2, **kw)
    for _ in range(steps):
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return w.detach(), opt, ((w - target) ** 2).mean().item()


def test_update_tracks_fp32_adamw():
    w8, opt8, loss8 = _quadratic_run(FP8AdamW, weight_decay=0.01)
    w32, opt32, loss32 = _quadratic_run(torch.optim.AdamW, weight_decay=0.01, eps=1e-8)
    assert loss8 == pytest.approx(loss32, rel=0.05)
    assert (w8 - w32).abs().mean() < 0.1 * (w32.abs().mean())  # each weight moved ~0.5; fp8 states shift it by a few %
    assert state_bytes(opt8) <= 0.26 * state_bytes(opt32)


def test_state_dict_round_trip():
    w, opt, _ = _quadratic_run(FP8AdamW, steps=3)
    state = opt.state_dict()
    fresh = FP8AdamW([torch.nn.Parameter(w.clone())], lr=1e-2)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"][0]["m_q"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(fresh.state_dict()["state"][0]["m_scale"], state["state"][0]["m_scale"])


def test_trains_and_resumes_through_budgetune(tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "corpus")
    cfg = dict(optim={"name": "adamw_fp8", "lr": 3e-3}, budget={"steps": 10}, checkpoint={"every": 0.4, "keep": 3})
    a, b = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch, **cfg)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    summary = __import__("json").loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5


def test_memory_model_knows_fp8_states():
    from transformers import LlamaConfig

    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    fp32 = estimate_memory(config, Recipe(optimizer="adamw")).terms["optimizer_states"]
    fp8 = estimate_memory(config, Recipe(optimizer="adamw_fp8")).terms["optimizer_states"]
    assert fp8 == pytest.approx(fp32 * (2 + 2 * 8 / 256) / 8, rel=1e-3)
