"""What our own optimizers share: the per-parameter step loop and the Adam direction."""

from __future__ import annotations

import torch


class PerParameterOptimizer(torch.optim.Optimizer):
    """Updates one parameter at a time, in fp32; subclasses implement `update`.

    Layer-wise mode (`update_in_backward`, GaLore's "per-layer weight updates"): a hook updates
    each parameter the moment its gradient is complete and frees that gradient, so at most one
    gradient exists at a time; `step` then has nothing left to do. As with LOMO, clipping is
    per tensor and the learning rate in effect is the one set for the previous step.
    """

    layerwise = False

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, index: int) -> None:
        raise NotImplementedError

    def _apply(self, p: torch.Tensor, grad: torch.Tensor, group: dict, index: int) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        self.update(p, grad, state, group, index)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            return loss
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._apply(p, p.grad.float(), group, index)
        return loss

    def update_in_backward(self, grad_clip: float = 0.0) -> None:
        """Switch to layer-wise mode (see the class doc)."""
        self.layerwise = True
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                p.register_post_accumulate_grad_hook(self._hook(group, index, grad_clip))

    def _hook(self, group: dict, index: int, grad_clip: float):
        @torch.no_grad()
        def update(p: torch.Tensor) -> None:
            grad = p.grad.float()
            p.grad = None
            if not torch.isfinite(grad).all():  # never apply NaN / inf (the loop counts the step as bad)
                return
            if grad_clip > 0:
                norm = grad.norm()
                if norm > grad_clip:
                    grad = grad * (grad_clip / (norm + 1e-6))
            self._apply(p, grad, group, index)

        return update


def adam_direction(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, group: dict, t: int) -> torch.Tensor:
    """Advance Adam's moments in place with `grad` (step t ≥ 1); return the bias-corrected m̂ / (√v̂ + ε)."""
    beta1, beta2 = group["betas"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))


def decoupled_decay(p: torch.Tensor, group: dict) -> None:
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
