"""GUM: GaLore's projection made unbiased by layer-wise sampling, with Muon as the base (Pan et al.).

Ours: no library implements it (torch's Muon orthogonalises whole matrices only; here the
momentum lives in GaLore's projected space). As we read the paper, per matrix W (m×n) with
gradient G, every `update_gap` steps P is taken from G's SVD (GaLore's side and shape) and the
matrix is *sampled* with probability q = `density` (seeded by period and position, so a
resumed run draws the same), its momentum restarting:

  not sampled: R = PᵀG (or G·P), momentum M ← β·M + R (r × max(m,n)),   U = P·NS(M)
  sampled:     Ĝ = PPᵀG + (G − PPᵀG) / q, momentum M ← β·M + Ĝ (m × n), U = NS(M)

so E[Ĝ | P] over the sampling equals G in the projected *and* the residual directions —
the bias GaLore's projection leaves is paid back by the few sampled matrices. NS is Muon's
quintic Newton–Schulz orthogonalisation (5 iterations, Nesterov momentum), and the update
is W ← W − η · 0.2·√max(m,n) · U (the RMS matching of Liu et al., so AdamW learning rates
carry over). Matrices no larger than the rank get full Muon; vectors (norms, biases) AdamW.
State: the momentum only — (1−q)·r·max(m,n) + q·m·n expected per projected matrix, plus P.
"""

from __future__ import annotations

import torch

from . import register
from .base import adam_direction, decoupled_decay
from .galore import GaLoreAdamW

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic iteration (Jordan et al.)


def orthogonalise(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """≈ U·Vᵀ of m = U·S·Vᵀ by Newton–Schulz, as Muon does (in fp32 here)."""
    a, b, c = NS_COEFFICIENTS
    x = m / (m.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class GUM(GaLoreAdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, rank=128, update_gap=200,
                 density=0.25, seed=0):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                                          update_gap=update_gap, density=density, seed=seed))

    def sampled(self, group: dict, index: int, period: int) -> bool:
        position = next(i for i, g in enumerate(self.param_groups) if g is group)
        gen = torch.Generator().manual_seed(group["seed"] * 1_000_003 + period * 10_007 + position * 101 + index)
        return bool(torch.rand((), generator=gen) < group["density"])

    def update(self, p, grad, state, group, index):
        t = int(state["step"].item())
        state["step"] += 1
        if p.ndim != 2:  # vectors: AdamW
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
            direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group, t + 1)
            decoupled_decay(p, group)
            p.add_(direction.to(p.dtype), alpha=-group["lr"])
            return
        beta = group["betas"][0]
        projected = self.projected(p, group["rank"])
        if projected and t % group["update_gap"] == 0:
            state["projection"] = self.projection(grad, group["rank"])
            state["sampled"] = torch.tensor(self.sampled(group, index, t // group["update_gap"]))
            state.pop("momentum", None)  # a new subspace (and maybe a new shape): momentum restarts
        if projected and not bool(state["sampled"]):
            grad = self.down(grad, state["projection"])
        elif projected:
            inside = self.up(self.down(grad, state["projection"]), state["projection"], p.shape)
            grad = inside + (grad - inside) / group["density"]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        momentum = state["momentum"]
        momentum.mul_(beta).add_(grad)
        direction = orthogonalise(grad.add(momentum, alpha=beta))  # Nesterov
        if projected and not bool(state["sampled"]):
            direction = self.up(direction, state["projection"], p.shape)
        decoupled_decay(p, group)
        p.add_(direction.to(p.dtype), alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)


@register("gum")
def gum(groups, cfg):
    return GUM(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=cfg.rank, update_gap=cfg.update_gap,
               density=cfg.density)
