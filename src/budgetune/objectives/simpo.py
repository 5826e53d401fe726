"""SimPO (Meng et al. 2024), reference-free: −log σ(β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ).

The same loss as TRL's CPOTrainer with loss_type "simpo" (tests/test_preference.py compares them);
rewards are β × the length-normalised log-probs."""

from __future__ import annotations

import torch.nn.functional as F

from .base import PreferenceObjective


class SimPO(PreferenceObjective):
    name = "simpo"
    default_beta = 2.0

    def __init__(self, options=None):
        super().__init__(options)
        self.gamma = getattr(options, "gamma", 1.0)

    def pair_losses(self, logps, lengths, reference=None):
        return simpo_loss(logps[:, 0] / lengths[:, 0].clamp(min=1), logps[:, 1] / lengths[:, 1].clamp(min=1), self.beta, self.gamma)


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float):
    """(losses, chosen rewards, rejected rewards) from per-token-average log-probs."""
    chosen_r, rejected_r = beta * chosen_avg, beta * rejected_avg
    return -F.logsigmoid(chosen_r - rejected_r - gamma), chosen_r.detach(), rejected_r.detach()
