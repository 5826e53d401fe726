"""Scaling laws against hand-computed values (METHODS.md §2)."""

import math

import pytest

from budgetune.plan.scaling import chinchilla, effective_tokens, propose_scratch, scratch_architecture, scratch_lr, step_law


def test_chinchilla_is_20_tokens_per_parameter():
    n, d = chinchilla(6 * 1e9 * 20e9)
    assert n == pytest.approx(1e9)
    assert d == pytest.approx(20e9)


def test_effective_tokens_data_constrained():
    assert effective_tokens(1e9, 0.5e9) == 0.5e9  # no repetition: every token is fresh
    # 4 epochs: R = 3 repetitions → U + U·15.4·(1 − e^(−3/15.4))
    assert effective_tokens(1e9, 4e9) == pytest.approx(1e9 + 1e9 * 15.4 * (1 - math.exp(-3 / 15.4)))
    assert effective_tokens(1e9, 4e9) > 0.9 * 4e9  # up to ~4 epochs is nearly as good as fresh data
    assert effective_tokens(1e9, 1000e9) == pytest.approx(1e9 * (1 + 15.4))  # returns vanish: at most U·(1 + R*)
    assert effective_tokens(1e9, 1000e9) - effective_tokens(1e9, 500e9) < 1e6


def test_step_law():
    lr, batch = step_law(1e8, 2e9)
    assert lr == pytest.approx(1.79 * 1e8**-0.713 * 2e9**0.307)
    assert batch == pytest.approx(0.58 * 2e9**0.571)
    # the planner's LR from scratch: the law's (2.5e-3 here); below 50M parameters at most 1.5e-3
    assert scratch_lr(1e8, 2e9) == pytest.approx(lr) and lr > 1.5e-3
    assert scratch_lr(2e6, 2e6) == 1.5e-3 < step_law(2e6, 2e6)[0]
    assert "capped at 0.0015" in " ".join(propose_scratch(1e13).reasoning)


def test_small_corpus_moves_the_optimum_to_a_larger_model():
    flops = 1e18
    plenty = propose_scratch(flops, unique_tokens=1e12)
    scarce = propose_scratch(flops, unique_tokens=1e8)
    assert plenty.params == pytest.approx(chinchilla(flops)[0])
    assert scarce.params > plenty.params and scarce.tokens < plenty.tokens
    assert scarce.epochs > 1
    assert any("unique tokens" in line for line in scarce.reasoning)


def test_scratch_architecture_hits_the_size():
    arch = scratch_architecture(25e6, vocab_size=8192)
    n = arch["num_hidden_layers"] * (4 * arch["hidden_size"] ** 2 + 3 * arch["hidden_size"] * arch["intermediate_size"])
    assert 0.6 < n / 25e6 < 1.6
    assert arch["hidden_size"] % arch["num_attention_heads"] == 0
