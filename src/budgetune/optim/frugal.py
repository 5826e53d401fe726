"""FRUGAL: full-rank updates at low-rank memory (Zmushko et al.).

Each matrix gradient is split into G = P·Pᵀ·G + (G − P·Pᵀ·G). The projected part gets a
state-full optimizer (Adam, with moments of the r-dimensional projection, as in GaLore);
the residual gets state-free signSGD. Subspaces:
  svd     P from the gradient's SVD, refreshed every `update_gap` steps (GaLore's)
  random  a random orthonormal P, redrawn every `update_gap` steps
  blocks  whole tensors: a `density` fraction of the matrices (cycled every `update_gap`
          steps) get Adam on their full gradient, the others signSGD (BAdam-style)
Vectors always get Adam. Ours: no library implements FRUGAL.
"""

from __future__ import annotations

import torch

from . import register
from .base import adam_direction, decoupled_decay
from .galore import GaLoreAdamW


class FrugalOptimizer(GaLoreAdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_gap=200,
                 scale=1.0, subspace="svd", density=0.25, sign_lr_ratio=1.0, seed=0):
        torch.optim.Optimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap, scale=scale,
            subspace=subspace, density=density, sign_lr_ratio=sign_lr_ratio, seed=seed))
        self._blocks: dict[int, tuple[int, set[int]]] = {}  # group → (period, matrices with Adam in it)

    def _random_projection(self, grad: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
        side = min(grad.shape)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(side, rank, generator=gen))
        return q.to(grad.device)

    def _active_blocks(self, group, period: int) -> set[int]:
        """Indices of the matrices that get Adam during this period (a seeded cyclic choice)."""
        cached = self._blocks.get(id(group))
        if cached is None or cached[0] != period:
            cached = self._blocks[id(group)] = (period, self._choose_blocks(group, period))
        return cached[1]

    @staticmethod
    def _choose_blocks(group, period: int) -> set[int]:
        matrices = [i for i, p in enumerate(group["params"]) if p.ndim == 2]
        n = max(1, round(group["density"] * len(matrices)))
        order = torch.randperm(len(matrices), generator=torch.Generator().manual_seed(group["seed"])).tolist()
        start = (period * n) % max(1, len(matrices))
        return {matrices[order[(start + j) % len(matrices)]] for j in range(min(n, len(matrices)))}

    def update(self, p, grad, state, group, index):
        rank, gap, lr = group["rank"], group["update_gap"], group["lr"]
        t = int(state["step"].item())
        residual = None
        if p.ndim == 2 and group["subspace"] == "blocks":
            if index not in self._active_blocks(group, t // gap):  # state-free: signSGD, moments dropped
                state.pop("exp_avg", None), state.pop("exp_avg_sq", None)
                state["step"] += 1
                decoupled_decay(p, group)
                p.add_(grad.sign().to(p.dtype), alpha=-lr * group["sign_lr_ratio"])
                return
            if t % gap == 0:  # a block that (re)enters starts its moments afresh
                state.pop("exp_avg", None), state.pop("exp_avg_sq", None)
        elif self.projected(p, rank):
            if t % gap == 0:
                state["projection"] = (self.projection(grad, rank) if group["subspace"] == "svd"
                                       else self._random_projection(grad, rank, group["seed"] * 1_000_003 + t + index))
            low = self.down(grad, state["projection"])
            residual = grad - self.up(low, state["projection"], p.shape)
            grad = low
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group, int(state["step"].item()))
        if residual is not None:
            direction = group["scale"] * self.up(direction, state["projection"], p.shape) + group["sign_lr_ratio"] * residual.sign()
        decoupled_decay(p, group)
        p.add_(direction.to(p.dtype), alpha=-lr)


@register("frugal")
def frugal(groups, cfg):
    return FrugalOptimizer(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=cfg.rank,
                           update_gap=cfg.update_gap, scale=cfg.scale, subspace=cfg.subspace, density=cfg.density,
                           sign_lr_ratio=cfg.sign_lr_ratio)
