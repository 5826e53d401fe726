"""Natural GaLore: Woodbury against a direct solve, Adam on the natural projected gradient
(two steps by hand), the gradient window, the planner's state formula, training, resume."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import OptimConfig
from budgetune.optim import build_optimizer
from budgetune.optim.natural_galore import NaturalGaLore, woodbury_natural_gradient

from helpers import interrupted_and_uninterrupted, tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def _direct(g, window, damping):
    lam = damping * window.pow(2).sum(dim=1).mean()
    fisher = lam * torch.eye(g.numel(), dtype=torch.float64) + window.T @ window
    return torch.linalg.solve(fisher, g)


def test_woodbury_equals_the_direct_inverse_fisher():
    torch.manual_seed(0)
    window = torch.randn(4, 30, dtype=torch.float64)
    g = torch.randn(30, dtype=torch.float64)
    for damping in (0.01, 1.0):
        torch.testing.assert_close(woodbury_natural_gradient(g, window, damping), _direct(g, window, damping))


def test_two_steps_run_adam_on_the_natural_projected_gradient():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 20))
    g1, g2 = torch.randn(8, 20), torch.randn(8, 20)
    opt = NaturalGaLore([w], lr=0.01, betas=(0.9, 0.999), rank=3, update_gap=10, history=5, damping=0.5)
    w.grad = g1.clone()
    opt.step()
    w.grad = g2.clone()
    opt.step()
    p = torch.linalg.svd(g1, full_matrices=False)[0][:, :3]  # from the first gradient, kept for update_gap steps
    r1, r2 = (p.T @ g1).flatten().double(), (p.T @ g2).flatten().double()
    n1 = _direct(r1, r1[None], 0.5)
    n2 = _direct(r2, torch.stack([r1, r2]), 0.5)
    state = opt.state[w]
    assert state["window"].shape == (2, 60)
    torch.testing.assert_close(state["exp_avg"].double().flatten(), 0.1 * (0.9 * n1 + n2), rtol=1e-4, atol=1e-6)


def test_window_is_capped_and_emptied_on_refresh():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 10))
    opt = NaturalGaLore([w], lr=0.01, rank=2, update_gap=4, history=3)
    sizes = []
    for _ in range(6):
        w.grad = torch.randn(10, 10)
        opt.step()
        sizes.append(opt.state[w]["window"].shape[0])
    assert sizes == [1, 2, 3, 3, 1, 2]


def test_planner_state_formula_equals_the_states_held():
    from budgetune.plan.memory import architecture, galore_state_elements
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    opt = build_optimizer(model, OptimConfig(name="natural_galore", rank=12, history=3))
    for _ in range(4):  # the window fills up to `history`
        model(input_ids=torch.randint(0, 96, (2, 8)), labels=torch.randint(0, 96, (2, 8))).loss.backward()
        opt.step()
        opt.zero_grad()
    held = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    trainable = sum(p.numel() for p in model.parameters())
    recipe = Recipe(method="full", optimizer="natural_galore", extra={"galore_rank": 12, "natural_history": 3})
    assert held == galore_state_elements(architecture(config), recipe, trainable)


def test_layerwise_mode_equals_the_stepped_optimizer():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))
    b = copy.deepcopy(a)
    stepped = NaturalGaLore(a.parameters(), lr=1e-2, rank=4, update_gap=2)
    fused = NaturalGaLore(b.parameters(), lr=1e-2, rank=4, update_gap=2)
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
    optim = {"name": "natural_galore", "lr": 1e-2, "rank": 8, "update_gap": 3, "scale": 1.0, "history": 4}
    straight, resumed = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch, optim=optim, budget={"steps": 12},
                                                      checkpoint={"every": 0.5})
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())  # the uninterrupted run
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["predicted"] is not None  # the planner knows it
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "model")  # a plain transformers model
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
