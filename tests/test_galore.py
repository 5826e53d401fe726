"""GaLore: projection, projected moments and update against hand computation; training; memory."""

import copy

import pytest
import torch

from budgetune.optim.galore import GaLoreAdamW
from budgetune.train import train

from helpers import tiny_config, write_text_corpus


def test_first_step_matches_hand_computed_projected_adam():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 20))
    g = torch.randn(8, 20)
    w.grad = g.clone()
    before = w.detach().clone()
    opt = GaLoreAdamW([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8, rank=3, update_gap=10, scale=0.5)
    opt.step()

    u, _, _ = torch.linalg.svd(g, full_matrices=False)
    p = u[:, :3]  # m ≤ n: left singular vectors
    r = p.T @ g  # 3 × 20
    m, v = 0.1 * r, 0.001 * r * r
    adam = (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)  # bias-corrected: sign-like first step
    expected = before - 0.1 * 0.5 * (p @ adam)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-5)
    state = opt.state[w]
    assert state["exp_avg"].shape == (3, 20) and state["projection"].shape == (8, 3)


def test_tall_matrices_project_on_the_right_and_vectors_are_plain_adam():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(30, 6))
    bias = torch.nn.Parameter(torch.randn(30))
    tall.grad, bias.grad = torch.randn(30, 6), torch.randn(30)
    opt = GaLoreAdamW([tall, bias], lr=0.01, rank=2)
    opt.step()
    assert opt.state[tall]["projection"].shape == (6, 2) and opt.state[tall]["exp_avg"].shape == (30, 2)
    assert "projection" not in opt.state[bias] and opt.state[bias]["exp_avg"].shape == (30,)


def test_projection_refreshes_every_update_gap():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 10))
    opt = GaLoreAdamW([w], lr=0.01, rank=2, update_gap=3)
    seen = []
    for _ in range(7):
        w.grad = torch.randn(10, 10)
        opt.step()
        seen.append(opt.state[w]["projection"].clone())
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[2], seen[3]) and not torch.equal(seen[5], seen[6])


def test_state_memory_is_a_fraction_of_adamw():
    from transformers import LlamaConfig

    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    adam = estimate_memory(config, Recipe(optimizer="adamw")).terms["optimizer_states"]
    galore = estimate_memory(config, Recipe(optimizer="galore", extra={"galore_rank": 64})).terms["optimizer_states"]
    assert galore < 0.35 * adam


def test_trains_through_budgetune(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    summary = train(tiny_config(tmp_path, corpus, optim={"name": "galore", "lr": 1e-2, "rank": 8, "update_gap": 5, "scale": 1.0},
                                budget={"steps": 15}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["predicted"] is not None


def test_layerwise_mode_updates_inside_backward_and_equals_the_stepped_optimizer():
    """GaLore's per-layer updates: the same update as a normal step, with no gradient kept."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))
    b = copy.deepcopy(a)
    stepped = GaLoreAdamW(a.parameters(), lr=1e-2, rank=4, update_gap=2)
    fused = GaLoreAdamW(b.parameters(), lr=1e-2, rank=4, update_gap=2)
    fused.update_in_backward()
    x = torch.randn(8, 16)
    for _ in range(3):
        stepped.zero_grad()
        a(x).pow(2).mean().backward()
        stepped.step()
        b(x).pow(2).mean().backward()
        assert all(p.grad is None for p in b.parameters())  # applied and freed during backward
        fused.step()  # nothing left to do
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_layerwise_refuses_accumulation(tmp_path):
    from budgetune.config import load_config
    from budgetune.errors import ConfigError

    with pytest.raises(ConfigError, match="grad_accum"):
        load_config({"data": {"train": ["x"]}, "budget": {"steps": 1}, "optim": {"name": "galore", "layerwise": True},
                     "train": {"grad_accum": 2}})
    with pytest.raises(ConfigError, match="no layer-wise mode"):
        load_config({"data": {"train": ["x"]}, "budget": {"steps": 1}, "optim": {"name": "adamw", "layerwise": True}})


def test_layerwise_trains_through_budgetune_and_the_planner_drops_the_gradients(tmp_path):
    from transformers import LlamaConfig

    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    corpus = write_text_corpus(tmp_path / "corpus")
    summary = train(tiny_config(tmp_path, corpus, optim={"name": "galore", "lr": 1e-2, "rank": 8, "update_gap": 5, "scale": 1.0,
                                                         "layerwise": True}, budget={"steps": 15}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    whole = estimate_memory(config, Recipe(optimizer="galore", extra={"galore_rank": 64})).sizes["gradients"]
    layerwise = estimate_memory(config, Recipe(optimizer="galore", extra={"galore_rank": 64, "layerwise": True})).sizes["gradients"]
    assert layerwise < whole / 4
