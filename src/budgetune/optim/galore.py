"""GaLore: Adam in a low-rank projection of each matrix's gradient (Zhao et al.).

Ours rather than galore-torch: the projection, the moments and the update are a few lines
of torch, and owning them lets the checkpoint hold the projection (exact resume) and the
memory model count the states.

For a weight W (m×n) with gradient G, every `update_gap` steps take the SVD of G and keep
P = U[:, :r] when m ≤ n (then R = Pᵀ G is r×n) or P = V[:, :r] otherwise (R = G P is
m×r). Adam's moments live on R; the update is ΔW = −η · α · P · Adam(R) (or Adam(R) · Pᵀ),
with decoupled weight decay. Vectors and matrices no larger than the rank get plain AdamW.
"""

from __future__ import annotations

import torch

from . import register
from .base import PerParameterOptimizer, adam_direction, decoupled_decay


class GaLoreAdamW(PerParameterOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_gap=200, scale=0.25):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap, scale=scale))

    @staticmethod
    def projected(p: torch.Tensor, rank: int) -> bool:
        return p.ndim == 2 and min(p.shape) > rank

    @staticmethod
    def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """P from the SVD of the gradient, on its smaller side."""
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        return u[:, :rank].contiguous() if grad.shape[0] <= grad.shape[1] else vh[:rank].T.contiguous()

    @staticmethod
    def down(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        return proj.T @ grad if grad.shape[0] <= grad.shape[1] else grad @ proj

    @staticmethod
    def up(update: torch.Tensor, proj: torch.Tensor, shape) -> torch.Tensor:
        return proj @ update if shape[0] <= shape[1] else update @ proj.T

    def update(self, p, grad, state, group, index):
        projected = self.projected(p, group["rank"])
        t = int(state["step"].item())
        if projected and t % group["update_gap"] == 0:
            state["projection"] = self.projection(grad, group["rank"])
        if projected:
            grad = self.down(grad, state["projection"])
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group, t + 1)
        if projected:
            direction = group["scale"] * self.up(direction, state["projection"], p.shape)
        decoupled_decay(p, group)
        p.add_(direction.to(p.dtype), alpha=-group["lr"])


@register("galore")
def galore(groups, cfg):
    return GaLoreAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=cfg.rank,
                       update_gap=cfg.update_gap, scale=cfg.scale)
