"""Deterministic, resumable row order: a seeded permutation per epoch, split across processes."""

from __future__ import annotations

import numpy as np


class RowSampler:
    """Hands out micro-batches of row indices. `position` counts rows consumed by all
    processes together; saving it and the seed is enough to continue exactly."""

    def __init__(self, n_rows: int, micro_batch: int, seed: int, world_size: int = 1, rank: int = 0, position: int = 0):
        if n_rows == 0:
            raise ValueError("no training rows")
        self.n_rows, self.micro_batch, self.seed = n_rows, micro_batch, seed
        self.world_size, self.rank = world_size, rank
        self.position = position
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n_rows)}
        return self._perms[epoch]

    @property
    def epoch(self) -> float:
        return self.position / self.n_rows

    def next(self) -> list[int]:
        """This process's rows for the next micro-batch."""
        start = self.position + self.rank * self.micro_batch
        out = []
        for k in range(start, start + self.micro_batch):
            epoch, i = divmod(k, self.n_rows)
            out.append(int(self._perm(epoch)[i]))
        self.position += self.micro_batch * self.world_size
        return out
