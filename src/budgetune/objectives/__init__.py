"""Training objectives: what a step's loss is. `sft` (next-token loss on the labelled tokens, the
default) or a preference objective on chosen/rejected pairs (METHODS.md §8): `dpo`, `orpo`, `simpo`.

An objective is one class registered by name, with a small interface (base.py): `count(batch)`
— the units the step's loss is a mean over (target tokens, or pairs) — and `loss(model, batch)`
— the summed loss of a micro-batch. Preference objectives also give held-out reward accuracy,
margin and log-probs (`heldout`), and DPO prepares its reference (`prepare`).
"""

from __future__ import annotations

from .base import Objective
from .dpo import DPO
from .orpo import ORPO
from .sft import SFT
from .simpo import SimPO

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (SFT, DPO, ORPO, SimPO)}


def get_objective(cfg) -> Objective:
    """The objective `cfg.objective.name` with its options (β, λ, γ) from the config."""
    return OBJECTIVES[cfg.objective.name](cfg.objective)


__all__ = ["OBJECTIVES", "Objective", "get_objective"]
