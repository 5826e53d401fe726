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
