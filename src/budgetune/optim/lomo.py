"""LOMO: fused backward and update (Lv et al.) — no optimizer state, no stored gradients.

Ours: a gradient hook per parameter applies the SGD update the moment that parameter's
gradient is complete and frees it, so at most one parameter's gradient exists at a time.
`step()` has nothing left to do. Consequences:
  - clipping is per tensor (each gradient is scaled to norm ≤ grad_clip inside its hook):
    the global norm is unknown until every gradient has been applied;
  - the learning rate in effect is the one the loop set for the previous step;
  - gradient accumulation and multi-process data parallel are refused (both need the full
    gradient before the update).
"""

from __future__ import annotations

import torch

from . import register
from .base import decoupled_decay


class Lomo(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0, grad_clip=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, grad_clip=grad_clip))
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._hook(group))

    @staticmethod
    def _hook(group):
        @torch.no_grad()
        def update(p: torch.Tensor) -> None:
            grad = p.grad
            p.grad = None
            if not torch.isfinite(grad).all():  # never apply NaN / inf (the loop counts the step as bad)
                return
            if group["grad_clip"] > 0:
                norm = grad.norm()
                if norm > group["grad_clip"]:
                    grad = grad * (group["grad_clip"] / (norm + 1e-6))
            decoupled_decay(p, group)
            p.add_(grad, alpha=-group["lr"])

        return update

    def step(self, closure=None):
        """The updates already happened during backward."""
        return closure() if closure is not None else None


@register("lomo")
def lomo(groups, cfg):
    return Lomo(groups, lr=cfg.lr, grad_clip=cfg.grad_clip)
