"""FRUGAL: the gradient split, Adam on the subspace and signSGD on the residual, block subspaces."""

import pytest
import torch

from budgetune.optim.frugal import FrugalOptimizer
from budgetune.train import train

from helpers import tiny_config, write_text_corpus


def test_first_step_is_projected_adam_plus_sign_of_the_residual():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 12))
    g = torch.randn(6, 12)
    w.grad = g.clone()
    before = w.detach().clone()
    opt = FrugalOptimizer([w], lr=0.1, rank=2, scale=0.5, subspace="svd", sign_lr_ratio=0.3)
    opt.step()
    p = torch.linalg.svd(g, full_matrices=False)[0][:, :2]
    low = p.T @ g
    residual = g - p @ low
    torch.testing.assert_close(p @ low + residual, g)  # the split is exact
    adam = (0.1 * low / 0.1) / ((0.001 * low * low / 0.001).sqrt() + 1e-8)
    expected = before - 0.1 * (0.5 * (p @ adam) + 0.3 * residual.sign())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-5)
    assert opt.state[w]["exp_avg"].shape == (2, 12)  # state only for the subspace


def test_random_subspace_is_orthonormal():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 10))
    w.grad = torch.randn(16, 10)
    opt = FrugalOptimizer([w], lr=0.01, rank=3, subspace="random")
    opt.step()
    proj = opt.state[w]["projection"]
    assert proj.shape == (10, 3)
    torch.testing.assert_close(proj.T @ proj, torch.eye(3), atol=1e-5, rtol=0)


def test_blocks_give_adam_to_a_fraction_and_sign_sgd_to_the_rest():
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(4)]
    bias = torch.nn.Parameter(torch.randn(4))
    grads = [torch.randn(4, 4) for _ in mats]
    befores = [m.detach().clone() for m in mats]
    for m, g in zip(mats, grads):
        m.grad = g.clone()
    bias.grad = torch.randn(4)
    opt = FrugalOptimizer(mats + [bias], lr=0.1, subspace="blocks", density=0.25, update_gap=2)
    opt.step()
    stateful = [i for i, m in enumerate(mats) if "exp_avg" in opt.state[m]]
    assert len(stateful) == 1 and "exp_avg" in opt.state[bias]
    for i, (m, g, b) in enumerate(zip(mats, grads, befores)):
        if i not in stateful:
            torch.testing.assert_close(m.detach(), b - 0.1 * g.sign())
    # after update_gap steps another block gets the state
    for _ in range(2):
        for m, g in zip(mats, grads):
            m.grad = g.clone()
        bias.grad = torch.randn(4)
        opt.step()
    assert [i for i, m in enumerate(mats) if "exp_avg" in opt.state[m]] != stateful


def test_memory_model_counts_frugal_states():
    from transformers import LlamaConfig

    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    adam = estimate_memory(config, Recipe(optimizer="adamw")).terms["optimizer_states"]
    svd = estimate_memory(config, Recipe(optimizer="frugal", extra={"galore_rank": 64, "frugal_subspace": "svd"})).terms["optimizer_states"]
    blocks = estimate_memory(config, Recipe(optimizer="frugal", extra={"frugal_subspace": "blocks", "frugal_density": 0.25})).terms["optimizer_states"]
    assert svd < 0.35 * adam
    assert blocks == pytest.approx(0.25 * adam, rel=0.01)


@pytest.mark.parametrize("subspace", ["svd", "blocks"])
def test_trains_through_budgetune(tmp_path, subspace):
    corpus = write_text_corpus(tmp_path / "corpus")
    optim = {"name": "frugal", "lr": 3e-3, "rank": 8, "update_gap": 5, "scale": 1.0, "subspace": subspace, "sign_lr_ratio": 0.1}
    summary = train(tiny_config(tmp_path, corpus, optim=optim, budget={"steps": 15}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["predicted"] is not None
