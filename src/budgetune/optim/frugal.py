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
from .galore import GaLoreAdamW


class FrugalOptimizer(GaLoreAdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_gap=200,
                 scale=1.0, subspace="svd", density=0.25, sign_lr_ratio=1.0, seed=0):
        torch.optim.Optimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap, scale=scale,
            subspace=subspace, density=density, sign_lr_ratio=sign_lr_ratio, seed=seed))

    def _random_projection(self, grad: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
        side = min(grad.shape)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(side, rank, generator=gen))
        return q.to(grad.device)

    def _active_blocks(self, group, period: int) -> set[int]:
        """Indices of the matrices that get Adam during this period (a seeded cyclic choice)."""
        matrices = [i for i, p in enumerate(group["params"]) if p.ndim == 2]
        n = max(1, round(group["density"] * len(matrices)))
        order = torch.randperm(len(matrices), generator=torch.Generator().manual_seed(group["seed"])).tolist()
        start = (period * n) % max(1, len(matrices))
        return {matrices[order[(start + j) % len(matrices)]] for j in range(min(n, len(matrices)))}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rank, gap, lr = group["rank"], group["update_gap"], group["lr"]
            blocks = None
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                t = int(state["step"].item())
                if p.ndim == 2 and group["subspace"] == "blocks":
                    if blocks is None:
                        blocks = self._active_blocks(group, t // gap)
                    if i not in blocks:  # state-free: signSGD on the whole gradient, moments dropped
                        state.pop("exp_avg", None), state.pop("exp_avg_sq", None)
                        state["step"] += 1
                        self._decay(p, group)
                        p.add_(grad.sign().to(p.dtype), alpha=-lr * group["sign_lr_ratio"])
                        continue
                    if t % gap == 0:  # a block that (re)enters starts its moments afresh
                        state.pop("exp_avg", None), state.pop("exp_avg_sq", None)
                    low, residual = grad, None
                elif self.projected(p, rank):
                    if t % gap == 0:
                        state["projection"] = (self.projection(grad, rank) if group["subspace"] == "svd"
                                               else self._random_projection(grad, rank, group["seed"] * 1_000_003 + t + i))
                    proj = state["projection"]
                    low = self.down(grad, proj)
                    residual = grad - self.up(low, proj, p.shape)
                else:
                    low, residual = grad, None
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
                state["step"] += 1
                n = int(state["step"].item())
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(low, 1 - beta1)
                v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
                update = (m / (1 - beta1**n)) / ((v / (1 - beta2**n)).sqrt_().add_(group["eps"]))
                if residual is not None:
                    update = group["scale"] * self.up(update, state["projection"], p.shape) + group["sign_lr_ratio"] * residual.sign()
                self._decay(p, group)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    @staticmethod
    def _decay(p, group):
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])


@register("frugal")
def frugal(groups, cfg):
    return FrugalOptimizer(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=cfg.rank,
                           update_gap=cfg.update_gap, scale=cfg.scale, subspace=cfg.subspace, density=cfg.density,
                           sign_lr_ratio=cfg.sign_lr_ratio)
