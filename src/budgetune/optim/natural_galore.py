"""Natural GaLore: GaLore with the inverse empirical Fisher on the projected gradient (Das).

Ours: no library implements it. Per projected matrix, the last s = `history` projected
gradients g_t, …, g_{t−s+1} (flattened, the columns of Gₜ, d × k) define the empirical
Fisher F = λI + GₜGₜᵀ; Woodbury's identity gives its inverse on the current gradient with
one k × k solve instead of a d × d one:

    g̃ = F⁻¹g = (g − Gₜ (λI + GₜᵀGₜ)⁻¹ Gₜᵀ g) / λ

and Adam's moments run on g̃ (then the update is GaLore's: ΔW = −η·α·P·Adam(g̃)). Our one
choice beyond the paper: λ = `damping` × the window's mean squared gradient norm, so one
value works at any gradient scale (Adam's normalisation makes the overall 1/λ irrelevant;
λ sets how strongly the recent dominant directions are damped). The window is emptied when
the projection is refreshed (older gradients live in another subspace). Vectors and small
matrices get plain AdamW, as in GaLore. State: GaLore's plus s × r × max(m, n) per matrix.
"""

from __future__ import annotations

import torch

from . import register
from .base import adam_direction, decoupled_decay
from .galore import GaLoreAdamW


def woodbury_natural_gradient(g: torch.Tensor, window: torch.Tensor, damping: float) -> torch.Tensor:
    """(λI + GGᵀ)⁻¹ g for the flat gradient g (d) and the window G (k × d, one gradient a row)."""
    lam = damping * window.pow(2).sum(dim=1).mean().clamp_min(1e-30)
    small = lam * torch.eye(window.shape[0], dtype=g.dtype, device=g.device) + window @ window.T
    return (g - window.T @ torch.linalg.solve(small, window @ g)) / lam


class NaturalGaLore(GaLoreAdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_gap=200, scale=0.25,
                 history=10, damping=0.1):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                                          update_gap=update_gap, scale=scale, history=history, damping=damping))

    def update(self, p, grad, state, group, index):
        if not self.projected(p, group["rank"]):
            return super().update(p, grad, state, group, index)  # plain AdamW, as GaLore
        t = int(state["step"].item())
        if t % group["update_gap"] == 0:
            state["projection"] = self.projection(grad, group["rank"])
            state["window"] = torch.zeros(0, device=grad.device)  # a new subspace: the old gradients no longer apply
        low = self.down(grad, state["projection"])
        flat = low.reshape(-1)
        window = torch.cat([state["window"].reshape(-1, flat.numel()), flat[None]])[-group["history"]:]
        state["window"] = window
        natural = woodbury_natural_gradient(flat, window, group["damping"]).reshape(low.shape)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], natural, group, t + 1)
        direction = group["scale"] * self.up(direction, state["projection"], p.shape)
        decoupled_decay(p, group)
        p.add_(direction.to(p.dtype), alpha=-group["lr"])


@register("natural_galore")
def natural_galore(groups, cfg):
    return NaturalGaLore(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=cfg.rank, update_gap=cfg.update_gap,
                         scale=cfg.scale, history=cfg.history, damping=cfg.damping)
