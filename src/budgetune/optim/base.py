"""What our own optimizers share: the per-parameter step loop and the Adam direction."""

from __future__ import annotations

import torch


class PerParameterOptimizer(torch.optim.Optimizer):
    """Updates one parameter at a time, in fp32; subclasses implement `update`."""

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, index: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                self.update(p, p.grad.float(), state, group, index)
        return loss


def adam_direction(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, group: dict, t: int) -> torch.Tensor:
    """Advance Adam's moments in place with `grad` (step t ≥ 1); return the bias-corrected m̂ / (√v̂ + ε)."""
    beta1, beta2 = group["betas"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))


def decoupled_decay(p: torch.Tensor, group: dict) -> None:
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
