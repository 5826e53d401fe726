"""Next-token cross-entropy on the labelled tokens: the default objective (the loss as before objectives existed)."""

from __future__ import annotations

from ..data import IGNORE
from ..lm_loss import token_losses
from .base import Objective


class SFT(Objective):
    name = "sft"

    def count(self, batch: dict) -> float:
        return float((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict):
        return token_losses(model, batch)[0]
