"""GUM: Muon's orthogonalisation, the sampled estimator's unbiasedness, the projected and
full-rank updates against hand computation, the planner's state formula, training, resume."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import OptimConfig
from budgetune.optim import build_optimizer
from budgetune.optim.gum import GUM, orthogonalise

from helpers import interrupted_and_uninterrupted, tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def test_newton_schulz_approximates_the_orthogonal_factor():
    torch.manual_seed(0)
    for shape in ((12, 30), (30, 12)):
        x = torch.randn(*shape)
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        o = orthogonalise(x)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3  # Muon's iteration lands near, not on, 1
        assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.9


def _first_step(density, seed_index=0):
    torch.manual_seed(seed_index)
    w = torch.nn.Parameter(torch.randn(8, 20))
    g = torch.randn(8, 20)
    w.grad = g.clone()
    before = w.detach().clone()
    opt = GUM([w], lr=0.1, betas=(0.0, 0.95), rank=3, update_gap=10, density=density)
    opt.step()
    return opt, w, g, before


def test_unsampled_matrix_takes_the_projected_muon_step():
    opt, w, g, before = _first_step(density=1e-9)
    state = opt.state[w]
    p = torch.linalg.svd(g, full_matrices=False)[0][:, :3]
    assert not bool(state["sampled"]) and state["momentum"].shape == (3, 20)
    torch.testing.assert_close(state["momentum"], p.T @ g, rtol=1e-5, atol=1e-5)
    expected = before - 0.1 * 0.2 * 20**0.5 * (state["projection"] @ orthogonalise(p.T @ g))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-5)


def test_sampled_matrix_pays_back_the_residual_and_the_estimator_is_unbiased():
    q = 0.999999  # sampled
    opt, w, g, before = _first_step(density=q)
    state = opt.state[w]
    p = state["projection"]
    assert bool(state["sampled"]) and state["momentum"].shape == (8, 20)
    inside = p @ p.T @ g
    torch.testing.assert_close(state["momentum"], inside + (g - inside) / q)
    torch.testing.assert_close(w.detach(), before - 0.1 * 0.2 * 20**0.5 * orthogonalise(state["momentum"]), rtol=1e-4, atol=1e-5)
    # E over the sampling, for any q: q · (sampled estimate) + (1 − q) · (projected estimate) = G
    for q in (0.1, 0.5):
        sampled = inside + (g - inside) / q
        torch.testing.assert_close(q * sampled + (1 - q) * inside, g, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_has_rate_q():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = GUM([w], density=0.25)
    group = opt.param_groups[0]
    draws = [opt.sampled(group, i, period) for i in range(40) for period in range(25)]
    assert draws == [opt.sampled(group, i, period) for i in range(40) for period in range(25)]
    assert 0.2 < sum(draws) / len(draws) < 0.3


@pytest.mark.parametrize("density", [1.0, 1e-9])
def test_planner_state_formula_equals_the_states_held(density):
    from budgetune.plan.memory import architecture, galore_state_elements
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    opt = build_optimizer(model, OptimConfig(name="gum", rank=12, density=density))
    model(input_ids=torch.randint(0, 96, (2, 8)), labels=torch.randint(0, 96, (2, 8))).loss.backward()
    opt.step()
    held = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k in ("momentum", "exp_avg", "exp_avg_sq", "projection"))
    trainable = sum(p.numel() for p in model.parameters())
    recipe = Recipe(method="full", optimizer="gum", extra={"galore_rank": 12, "frugal_density": density})
    assert held == galore_state_elements(architecture(config), recipe, trainable)


def test_layerwise_mode_equals_the_stepped_optimizer():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))
    b = copy.deepcopy(a)
    stepped, fused = GUM(a.parameters(), lr=1e-2, rank=4, update_gap=2), GUM(b.parameters(), lr=1e-2, rank=4, update_gap=2)
    fused.update_in_backward()
    x = torch.randn(8, 16)
    for _ in range(3):
        stepped.zero_grad()
        a(x).pow(2).mean().backward()
        stepped.step()
        b(x).pow(2).mean().backward()
        fused.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.slow  # end-to-end: three training runs
def test_trains_resumes_exactly_and_saves_a_transformers_model(tmp_path, corpus, monkeypatch):
    optim = {"name": "gum", "lr": 1e-2, "rank": 8, "update_gap": 3, "density": 0.3}
    straight, resumed = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch, optim=optim, budget={"steps": 12},
                                                      checkpoint={"every": 0.5})
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())  # the uninterrupted run
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["predicted"] is not None  # the planner knows it
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "model")  # a plain transformers model
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_density_is_validated():
    from budgetune.config import load_config
    from budgetune.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.density"):
        load_config({"data": {"train": ["x"]}, "budget": {"steps": 1}, "optim": {"name": "gum", "density": 0}})
