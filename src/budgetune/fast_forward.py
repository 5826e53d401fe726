"""Fast Forward (Rahamim et al.): repeat the last optimizer update while a tiny held-out loss falls.

Ours (no library has it). Every `every` optimizer steps the loop hands over the update that
step made, Δ = θ_t − θ_{t−1} over the trainable parameters; Δ is added again as long as the
loss on a few held-out rows keeps falling, and the addition that made it rise is taken back.
A repeat costs one forward pass over those rows — no backward, no optimizer — so it is cheap
where the update direction stays good (low-rank adapters). Repeats count against the time
budget like everything else, are not optimizer steps, and leave the optimizer state alone.
"""

from __future__ import annotations

from typing import Callable

import torch


class FastForward:
    def __init__(self, every: int, loss: Callable[[], float], keep_going: Callable[[], bool], max_repeats: int = 1000):
        self.every, self.loss, self.keep_going, self.max_repeats = every, loss, keep_going, max_repeats
        self.before: list[torch.Tensor] | None = None
        self.repeats = 0  # over the run

    def due(self, step: int) -> bool:
        """Whether optimizer step number `step` (1-based) is followed by a fast-forward stage."""
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def remember(self, params: list[torch.Tensor]) -> None:
        """θ_{t−1}: call right before the optimizer step whose update will be repeated."""
        self.before = [p.detach().clone() for p in params]

    @torch.no_grad()
    def run(self, params: list[torch.Tensor]) -> tuple[int, float]:
        """Repeat θ_t − θ_{t−1}; return (repeats kept, held-out loss after them)."""
        delta = [p.detach() - b for p, b in zip(params, self.before)]
        self.before = None
        best, kept = self.loss(), 0
        while kept < self.max_repeats and self.keep_going():
            for p, d in zip(params, delta):
                p.add_(d)
            loss = self.loss()
            if not loss < best:  # rose (or stalled): take the last repeat back
                for p, d in zip(params, delta):
                    p.sub_(d)
                break
            best, kept = loss, kept + 1
        self.repeats += kept
        return kept, best
