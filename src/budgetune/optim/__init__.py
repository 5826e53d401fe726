"""Optimizers by name. A builder takes (named trainable parameters, OptimConfig) → torch optimizer."""

from __future__ import annotations

from typing import Callable

import torch

OPTIMIZERS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        OPTIMIZERS[name] = fn
        return fn

    return wrap


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and gains (1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@register("adamw")
def adamw(named_params, cfg):
    params = list(named_params)
    fused = all(p.is_cuda for _, p in params) and bool(params)
    return torch.optim.AdamW(
        param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


@register("sgd")
def sgd(named_params, cfg):
    return torch.optim.SGD(param_groups(list(named_params), cfg.weight_decay), lr=cfg.lr, momentum=cfg.beta1)


def build_optimizer(model, cfg):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the method left no trainable parameters")
    return OPTIMIZERS[cfg.name](named, cfg)
