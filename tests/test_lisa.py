"""LISA: which layers train, that only they change, that state follows them, and exact resume."""

import pytest
import torch

from budgetune.methods.lisa import LisaOptions, active_layers
from budgetune.train import train

from helpers import interrupted_and_uninterrupted, tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def test_sampling_is_seeded_per_period():
    opts = LisaOptions(layers=2, interval=5)
    assert active_layers(8, opts, 0) == active_layers(8, opts, 4)  # same period
    periods = {tuple(active_layers(8, opts, 5 * k)) for k in range(10)}
    assert len(periods) > 3 and all(len(p) == 2 for p in periods)


def test_only_active_layers_embeddings_and_head_change(tmp_path, corpus, monkeypatch):
    """With one period, the layers LISA did not draw keep their initial weights."""
    from transformers import AutoModelForCausalLM

    summary = train(tiny_config(tmp_path, corpus, method={"name": "lisa", "layers": 1, "interval": 100},
                                budget={"steps": 6}, model={"arch": {"num_hidden_layers": 4}}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    torch.manual_seed(0)  # the scratch init is seeded by train.seed
    from budgetune.config import load_config
    from budgetune.models import load_model, load_tokenizer

    cfg = load_config(tmp_path / "run" / "config.yaml")
    initial = load_model(cfg, load_tokenizer(cfg, log=lambda m: None), torch.device("cpu"))
    active = active_layers(4, LisaOptions(layers=1, interval=100), 0)
    for name, p in trained.named_parameters():
        before = dict(initial.named_parameters())[name]
        layer = int(name.split(".")[2]) if ".layers." in name else None
        changed = not torch.equal(p, before)
        if layer is None:
            assert changed, name  # embeddings, head, final norm always train
        else:
            assert changed == (layer in active), name
    assert summary["trainable_parameters"] < summary["parameters"]


def test_resume_equals_uninterrupted_across_switches(tmp_path, corpus, monkeypatch):
    a, b = interrupted_and_uninterrupted(tmp_path, corpus, monkeypatch, method={"name": "lisa", "layers": 1, "interval": 3},
                                         budget={"steps": 10}, checkpoint={"every": 0.5, "keep": 3},
                                         model={"arch": {"num_hidden_layers": 4}})
    assert len(a) > 10  # every weight is checkpointed, not only the active layers
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_memory_model_counts_active_layers_only():
    from transformers import LlamaConfig

    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.recipe import Recipe

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4)
    full = estimate_memory(config, Recipe(method="full"))
    lisa = estimate_memory(config, Recipe(method="lisa", extra={"method_options": {"name": "lisa", "layers": 2}}))
    assert lisa.terms["weights"] == full.terms["weights"]
    layer = full.trainable - lisa.trainable
    assert layer > 0 and lisa.terms["optimizer_states"] == pytest.approx(full.terms["optimizer_states"] * lisa.trainable / full.trainable)
