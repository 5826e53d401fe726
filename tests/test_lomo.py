"""LOMO: the fused update equals an SGD step, gradients are freed, and training works."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.errors import ConfigError
from budgetune.optim.lomo import Lomo
from budgetune.train import train

from helpers import tiny_config, write_text_corpus


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4))


def test_update_equals_sgd_and_frees_gradients():
    ids = torch.randint(0, 50, (2, 10))
    sgd_model, lomo_model = _model(), _model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    sgd_model(input_ids=ids, labels=ids).loss.backward()
    sgd.step()

    Lomo(lomo_model.parameters(), lr=0.1)
    lomo_model(input_ids=ids, labels=ids).loss.backward()  # the update happens here
    for (name, a), (_, b) in zip(sgd_model.named_parameters(), lomo_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert b.grad is None  # nothing stored


def test_per_tensor_clipping():
    w = torch.nn.Parameter(torch.zeros(4))
    Lomo([w], lr=1.0, grad_clip=1.0)
    (w * torch.tensor([30.0, 40.0, 0.0, 0.0])).sum().backward()
    torch.testing.assert_close(w.detach(), -torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-4, atol=1e-5)


def test_trains_through_budgetune_and_refuses_accumulation(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    summary = train(tiny_config(tmp_path, corpus, optim={"name": "lomo", "lr": 0.5}, budget={"steps": 15}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3
    assert summary["predicted"]["memory_terms_mb"]["optimizer_states"] == 0
    with pytest.raises(ConfigError, match="grad_accum"):
        train(tiny_config(tmp_path / "b", corpus, optim={"name": "lomo"}, train={"grad_accum": 2}), quiet=True)
