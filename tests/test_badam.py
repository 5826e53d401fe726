"""BAdam: block order, that only the active block changes, optimizer state for it alone,
the planner's count, and exact resume across block switches."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import OptimConfig
from budgetune.methods import METHODS
from budgetune.methods.badam import BadamOptions, active_block
from budgetune.optim import build_optimizer
from budgetune.train import train

from helpers import interrupted_and_uninterrupted, tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def test_block_orders():
    asc = [active_block(4, BadamOptions(interval=3, order="ascending"), s) for s in range(0, 24, 3)]
    desc = [active_block(4, BadamOptions(interval=3, order="descending"), s) for s in range(0, 24, 3)]
    assert asc == [0, 1, 2, 3, 0, 1, 2, 3] and desc == [3, 2, 1, 0, 3, 2, 1, 0]
    assert active_block(4, BadamOptions(interval=3), 4) == active_block(4, BadamOptions(interval=3), 5)  # same period
    rnd = BadamOptions(interval=1, order="random", seed=1)
    epochs = [[active_block(5, rnd, 5 * e + i) for i in range(5)] for e in range(4)]
    assert all(sorted(e) == list(range(5)) for e in epochs)  # each layer once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_one_block_trains_and_the_optimizer_holds_state_for_it_only():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=4))
    method = METHODS["badam"]
    opts = method.Options(interval=2, order="ascending")
    model = method.prepare(model, opts)
    assert not method.select(model, opts, 0) and not method.select(model, opts, 1)  # prepare already chose block 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.0.") for n in trainable)
    opt = build_optimizer(model, OptimConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    held = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert held == 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert method.select(model, opts, 2)  # period 1: the next block
    assert all(n.startswith("model.layers.1.") for n, p in model.named_parameters() if p.requires_grad)


def test_planner_counts_one_layer():
    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4)
    full = estimate_memory(config, Recipe(method="full"))
    badam = estimate_memory(config, Recipe(method="badam", extra={"method_options": {"name": "badam"}}))
    model = AutoModelForCausalLM.from_config(config)
    assert badam.trainable == sum(p.numel() for p in model.model.layers[0].parameters())
    assert badam.terms["weights"] == full.terms["weights"]
    assert badam.terms["optimizer_states"] == 8 * badam.trainable
    assert badam.total < full.total


def test_trains_from_the_cli_config_and_only_the_scheduled_blocks_change(tmp_path, corpus):
    from budgetune.config import load_config
    from budgetune.models import load_model, load_tokenizer

    summary = train(tiny_config(tmp_path, corpus, method={"name": "badam", "interval": 4, "order": "ascending"},
                                budget={"steps": 8}, optim={"lr": 1e-2}, model={"arch": {"num_hidden_layers": 4}}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["predicted"] is not None
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # a plain transformers model
    cfg = load_config(tmp_path / "run" / "config.yaml")
    initial = dict(load_model(cfg, load_tokenizer(cfg, log=lambda m: None), torch.device("cpu")).named_parameters())
    for name, p in trained.named_parameters():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        assert (not torch.equal(p, initial[name])) == (layer in (0, 1)), name  # 8 steps, K = 4: layers 0 then 1


@pytest.mark.slow  # end-to-end: three training runs
def test_resume_equals_uninterrupted_across_switches(tmp_path, corpus, monkeypatch):
    a, b = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch,
                                         method={"name": "badam", "interval": 3, "order": "random", "seed": 2},
                                         budget={"steps": 10}, checkpoint={"every": 0.5, "keep": 3},
                                         model={"arch": {"num_hidden_layers": 4}})
    assert len(a) > 10  # every weight is checkpointed
    for name in a:
        assert torch.equal(a[name], b[name]), name
