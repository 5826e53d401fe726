"""The objective interface, and what the preference objectives share: the summed log-probs of each
pair's chosen and rejected answer, computed from packed pair rows in one forward pass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import IGNORE
from ..lm_loss import token_logps


class Objective:
    """A training objective. `loss` may keep per-step statistics that `step_metrics` hands over."""

    name = "sft"
    preference = False  # trains on preference pairs (data.format preference)

    def __init__(self, options=None):
        self.options = options

    def count(self, batch: dict) -> float:
        """The units the step's loss is a mean over (summed over the step's micro-batches)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The summed loss of one micro-batch (its mean is this over `count`)."""
        raise NotImplementedError

    def prepare(self, run) -> None:
        """Anything the objective needs before the first step (DPO: its reference); checks the data."""
        check_data(self, run.data.format)

    def step_metrics(self) -> dict:
        """Statistics of the micro-batches since the last call (logged with the step), then reset."""
        return {}


def pair_logps(model, batch: dict, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([pairs, 2] summed log-probs of each pair's chosen and rejected answer, [pairs, 2] answer
    tokens), pairs in row order. `segments` (packing.build_pair_rows) tells which half of which
    pair every token is in; a target belongs to its own token's segment."""
    labels = batch["labels"]
    per_token = token_logps(model, dict(batch))
    seg = segments[:, 1:].long()
    valid = (labels[:, 1:] != IGNORE) & (seg > 0)
    per_row = segments.long().amax(dim=1) // 2
    first = torch.cumsum(per_row, 0) - per_row  # index of each row's first pair
    slot = ((first[:, None] + (seg - 1).clamp(min=0) // 2) * 2 + (seg - 1).clamp(min=0) % 2)[valid]
    n = int(per_row.sum())
    sums = torch.zeros(2 * n, dtype=per_token.dtype, device=per_token.device).index_add(0, slot, per_token[valid])
    counts = torch.zeros(2 * n, dtype=per_token.dtype, device=per_token.device).index_add(
        0, slot, torch.ones_like(per_token[valid]))
    return sums.view(n, 2), counts.view(n, 2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stably (Mächler 2012: log(−expm1 x) near 0, log1p(−exp x) below −ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PreferenceObjective(Objective):
    """Shared by dpo, orpo, simpo: a micro-batch of pair rows → per-pair losses and rewards."""

    preference = True
    default_beta = 0.1

    def __init__(self, options=None):
        super().__init__(options)
        beta = getattr(options, "beta", None)
        self.beta = self.default_beta if beta is None else beta
        self._stats = torch.zeros(6, dtype=torch.float64)

    def prepare_eval(self, run_dir, rows, own_split: bool) -> None:
        """`budgetune eval` of a finished run: what the held-out metrics need (DPO: its reference)."""

    def count(self, batch: dict) -> float:
        return float((batch["segments"].max(dim=1).values // 2).sum())

    def pair_losses(self, logps: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor | None):
        """(losses, chosen rewards, rejected rewards), one per pair."""
        raise NotImplementedError

    def reference(self, model, batch: dict, segments: torch.Tensor) -> torch.Tensor | None:
        return None

    def pairs(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses, [pairs, 5] statistics: loss, reward accuracy, margin, chosen and rejected log-probs)."""
        batch = dict(batch)
        segments = batch.pop("segments")
        cached = batch.pop("reference_logps", None)
        if cached is not None:  # computed once before training (rows × pair slots × 2)
            per_row = segments.long().amax(dim=1) // 2
            reference = torch.cat([cached[r, : int(k)] for r, k in enumerate(per_row)])
        else:  # before the policy's forward: its logits are freed before the policy's graph is built (no extra peak memory)
            reference = self.reference(model, batch, segments)
        logps, lengths = pair_logps(model, batch, segments)
        reference = None if reference is None else reference.to(logps)
        losses, chosen_r, rejected_r = self.pair_losses(logps, lengths, reference)
        d = logps.detach()
        stats = torch.stack([losses.detach(), (chosen_r > rejected_r).to(d), chosen_r - rejected_r, d[:, 0], d[:, 1]], dim=1)
        return losses, stats

    def loss(self, model, batch: dict) -> torch.Tensor:
        losses, stats = self.pairs(model, batch)
        self._stats += torch.cat([stats.sum(0).double().cpu(), torch.tensor([float(len(stats))], dtype=torch.float64)])
        return losses.sum()

    def step_metrics(self) -> dict:
        s, self._stats = self._stats, torch.zeros(6, dtype=torch.float64)
        return summarize(s)


STAT_NAMES = ("reward_accuracy", "margin", "chosen_logp", "rejected_logp")


def summarize(sums: torch.Tensor) -> dict:
    """Sums over pairs (loss, accuracy, margin, chosen, rejected, pairs) → means named for metrics.jsonl."""
    n = float(sums[5])
    if n == 0:
        return {}
    return {name: round(float(sums[i + 1]) / n, 5) for i, name in enumerate(STAT_NAMES)}


def check_data(objective: Objective, data_format: str) -> None:
    """Preference objectives need preference pairs, and SFT cannot train on them."""
    from ..errors import ConfigError

    if objective.preference and data_format != "preference":
        raise ConfigError(f"config key 'objective.name': {objective.name} trains on preference pairs, but the data is "
                          f"{data_format} data; give records with 'prompt', 'chosen' and 'rejected' (data.format: preference)")
    if not objective.preference and data_format == "preference":
        raise ConfigError("config key 'objective.name': the data are preference pairs (chosen/rejected); set objective.name "
                          "to dpo, orpo or simpo")
