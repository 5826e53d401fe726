"""ORPO (Hong et al. 2024), reference-free: the SFT loss on the chosen answer plus λ times the
odds-ratio loss −log σ(log odds(y_w) − log odds(y_l)), odds(y) = P/(1 − P) of the
length-normalised probability P = exp(mean token log-prob).

Per pair, the SFT term is the chosen answer's mean token loss (the paper's per-example mean; TRL's
ORPOTrainer averages over all chosen tokens of its batch instead). The odds-ratio term is TRL's
`odds_ratio_loss` (tests/test_preference.py compares them). Rewards: the length-normalised log-probs."""

from __future__ import annotations

import torch.nn.functional as F

from .base import PreferenceObjective, log1mexp


class ORPO(PreferenceObjective):
    name = "orpo"

    def __init__(self, options=None):
        super().__init__(options)
        self.odds_weight = getattr(options, "odds_weight", 0.1)

    def pair_losses(self, logps, lengths, reference=None):
        chosen_avg, rejected_avg = logps[:, 0] / lengths[:, 0].clamp(min=1), logps[:, 1] / lengths[:, 1].clamp(min=1)
        return orpo_loss(chosen_avg, rejected_avg, self.odds_weight)


def odds_ratio_term(chosen_avg, rejected_avg):
    """log σ(log odds(y_w) − log odds(y_l)) per pair (≤ 0; the ORPO loss subtracts λ times it)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return F.logsigmoid(log_odds)


def orpo_loss(chosen_avg, rejected_avg, odds_weight: float):
    """(losses, chosen rewards, rejected rewards) from per-token-average log-probs."""
    losses = -chosen_avg - odds_weight * odds_ratio_term(chosen_avg, rejected_avg)
    return losses, chosen_avg.detach(), rejected_avg.detach()
