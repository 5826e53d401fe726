"""Optimizers by name. A builder takes (parameter groups, OptimConfig) → torch optimizer."""

from __future__ import annotations

from typing import Callable

import torch

OPTIMIZERS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        OPTIMIZERS[name] = fn
        return fn

    return wrap


def param_groups(named_params, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices only (biases, norms and gains — 1-D tensors — are not decayed); a group per
    learning-rate scale. The loop sets each group's lr to the schedule's lr × its `lr_scale`."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in named_params:
        scale = next((s for key, s in (lr_scales or {}).items() if key in name), 1.0)
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


@register("adamw")
def adamw(groups, cfg):
    if any(p.dtype == torch.bfloat16 for g in groups for p in g["params"]):
        return kahan_adamw(groups, cfg)
    # torch's fused kernel on CUDA and on the CPU too (transformers' Trainer default since torch 2.8): on the
    # CPU torch otherwise takes its single-tensor path: 12.1 vs 1.2 ms an update for the 2.6M demo model, 525 vs
    # 89 ms for SmolLM2-135M, with sqrt/division temporaries of 2x the largest tensor (benchmarks/adamw_cpu.py,
    # docs/benchmarks.md "AdamW on the CPU: fused"); the fused kernel updates in place.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def kahan_adamw(groups, cfg):
    """AdamW for bf16 weights (train.precision pure-bf16): moments in bf16 and each update added
    with Kahan compensation, so updates smaller than bf16's resolution accumulate instead of
    rounding away. torch-optimi's AdamW does exactly this (kahan_sum); its weight decay is
    torch's (lr × wd, decouple_lr off)."""
    try:
        import optimi
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("train.precision pure-bf16 (bf16 weights) needs torch-optimi for its Kahan-compensated AdamW: "
                          "pip install 'budgetune[bf16]'") from None
    return optimi.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0, kahan_sum=True)


@register("sgd")
def sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)


def build_optimizer(model, cfg, lr_scales: dict[str, float] | None = None):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the method left no trainable parameters")
    optimizer = OPTIMIZERS[cfg.name](param_groups(named, cfg.weight_decay, lr_scales), cfg)
    if cfg.layerwise:
        optimizer.update_in_backward(cfg.grad_clip)
    return optimizer


def updates_in_backward(cfg) -> bool:
    """Whether the optimizer applies each update inside backward (LOMO, or layer-wise mode):
    no gradient accumulation, no data parallelism, no switching methods."""
    return cfg.name == "lomo" or cfg.layerwise


from . import adamw_8bit, apollo, fp8_adamw, frugal, galore, gum, lomo, natural_galore  # noqa: E402,F401  (registration)

LAYERWISE = ("adamw_fp8", "frugal", "galore", "gum", "natural_galore")  # ours, built on base.PerParameterOptimizer
