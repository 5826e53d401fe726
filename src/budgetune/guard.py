"""What keeps a run alive on flaky machines: stop signals, bad numbers, out-of-memory.

The loop (train.py) asks these small objects what to do; each holds one policy:
- `StopSignals`: SIGINT / SIGTERM set a flag the loop reads between steps (it then writes a
  checkpoint and exits); a second signal interrupts at once.
- `BadSteps`: a step whose loss or gradient norm is not finite is skipped (no optimizer
  update) and counted; after `limit` in a row the run goes back to its last checkpoint with
  the learning rate halved, and if that happens again it stops.
- `halve_micro_batch`: on out-of-memory the same rows are re-split into micro-batches half
  as large (accumulation doubles, the effective batch and the data order stay the same).
"""

from __future__ import annotations

import math
import signal
import threading


class StopSignals:
    NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # the second one: stop now, no checkpoint
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        return self.NAMES.get(self.received, str(self.received))


class BadSteps:
    def __init__(self, limit: int, restores: int = 1):
        self.limit, self.restores_allowed = limit, restores
        self.total = self.in_a_row = self.restores = 0
        self.lr_factor = 1.0

    @staticmethod
    def finite(*values) -> bool:
        return all(v is None or math.isfinite(float(v)) for v in values)

    def record(self, ok: bool) -> str:
        """'ok', 'skip' (this step is dropped), 'restore' (go back to the last checkpoint,
        LR halved) or 'give_up'."""
        if ok:
            self.in_a_row = 0
            return "ok"
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row < self.limit:
            return "skip"
        if self.restores >= self.restores_allowed:
            return "give_up"
        self.restores += 1
        self.in_a_row = 0
        self.lr_factor *= 0.5
        return "restore"

    def state_dict(self) -> dict:
        return {"total": self.total, "restores": self.restores, "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.restores, self.lr_factor = state["total"], state["restores"], state["lr_factor"]


def halve_micro_batch(rows: list[list[int]]) -> list[list[int]]:
    """The same rows in micro-batches half as large (order kept)."""
    flat = [i for micro in rows for i in micro]
    size = max(1, len(rows[0]) // 2)
    return [flat[i : i + size] for i in range(0, len(flat), size)]
