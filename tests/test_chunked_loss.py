"""The chunked LM head + loss of large vocabularies: the same loss and gradients as the plain
path, less memory, and the planner counts one chunk of logits."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune import lm_loss
from budgetune.lm_loss import token_losses
from budgetune.plan.memory import estimate_memory
from budgetune.plan.recipe import Recipe


def _model(vocab: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=2))


def _batch(vocab):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    return {"input_ids": ids, "labels": labels}


def test_chunked_equals_plain_in_loss_and_gradients(monkeypatch):
    vocab = 40000
    model = _model(vocab)
    assert lm_loss.loss_chunk(model.config) > 0  # a large vocabulary takes the chunked path
    monkeypatch.setattr(lm_loss, "loss_chunk", lambda config: 7)  # several uneven chunks on this small batch
    loss, count = token_losses(model, _batch(vocab))
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert "forward" not in vars(model.lm_head)  # the head is itself again

    model.zero_grad()
    monkeypatch.setattr(lm_loss, "loss_chunk", lambda config: 0)  # the plain path
    plain_loss, plain_count = token_losses(model, _batch(vocab))
    plain_loss.backward()
    assert count == plain_count
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, rtol=1e-4, atol=1e-5)  # summation order differs


@torch.no_grad()
def test_token_logps_chunked_equals_plain_and_sums_to_the_loss(monkeypatch):
    """The preference objectives' per-token log-probs: the same on the chunked path as on the plain one, 0 where the
    label is ignored, and minus their sum is token_losses' loss."""
    vocab = 40000
    model = _model(vocab)
    monkeypatch.setattr(lm_loss, "loss_chunk", lambda config: 7)
    chunked = lm_loss.token_logps(model, _batch(vocab))
    assert "forward" not in vars(model.lm_head)  # the head is itself again
    monkeypatch.setattr(lm_loss, "loss_chunk", lambda config: 0)
    plain = lm_loss.token_logps(model, _batch(vocab))
    assert chunked.shape == plain.shape == (2, 23)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert (plain[0, :4] == 0).all() and (plain[0, 4:] < 0).all()  # the prompt's targets carry no log-prob
    loss, _ = token_losses(model, _batch(vocab))
    torch.testing.assert_close(-plain.sum(), loss, rtol=1e-5, atol=1e-4)


def test_planner_counts_one_chunk_of_logits():
    big = LlamaConfig(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    estimate = estimate_memory(big, Recipe(micro_batch=8, seq_len=1024))
    chunk = lm_loss.loss_chunk(big)
    assert 64 <= chunk < 1024 and estimate.sizes["logits_loss"] == 3 * chunk * 151936 * 4  # not 3 × 8192 tokens
    small = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    assert estimate_memory(small, Recipe(micro_batch=8, seq_len=1024)).sizes["logits_loss"] == 3 * 8192 * 2048 * 4
