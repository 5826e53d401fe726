"""What the benchmark scripts share: one `budgetune.train` in a fresh process (clean peak-memory
readings, no state carried between runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def train_in_process(cfg: dict, out: Path) -> dict:
    """Train `cfg` in its own process (its config written to `out`.json); the run's summary.json,
    read from `out`. A failed run raises RuntimeError with the end of its stderr."""
    path = out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-c", f"import json, budgetune; budgetune.train(json.load(open({str(path)!r})), quiet=True)"],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def peer_max_steps(seconds: float, make_probe, probe_steps: int = 8, timed: int = 5) -> tuple[int, float]:
    """A peer trainer's `max_steps` for a wall-clock budget, and what finding it took in seconds.

    transformers' and TRL's schedules are functions of a step count (budgetune's are functions of
    budget progress), so a peer at equal wall-clock needs the number of steps that fit: `make_probe(n)`
    builds the peer for n steps on a throwaway copy of its model; the last `timed` of `probe_steps`
    are timed (the first pay for set-up and warm-up and would make max_steps too small). The probe
    is not charged to the peer's budget. Without this a peer run with a huge max_steps and a
    warmup fraction never leaves its warmup."""
    import time

    from transformers import TrainerCallback

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.monotonic())

    started = time.monotonic()
    probe = make_probe(probe_steps)
    probe.add_callback(StepEnds())
    probe.train()
    step_s = (ends[-1] - ends[-1 - timed]) / timed
    return max(1, int(seconds / step_s)), time.monotonic() - started
