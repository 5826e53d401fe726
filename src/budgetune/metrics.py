"""The run's measurements: one JSON object per line in RUN_DIR/metrics.jsonl, and memory readings."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, resident-set high-water on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLog:
    """Appends records, one line each, flushed as written (a kill loses at most a torn last
    line, which the next run's log cuts off before appending)."""

    def __init__(self, path: Path | None, flush_every_s: float = 0.0):
        if path is not None and path.exists():
            _drop_torn_last_line(path)
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self._flush_every = flush_every_s
        self._last_flush = time.monotonic()

    def write(self, **record) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        if time.monotonic() - self._last_flush >= self._flush_every:
            self._file.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_torn_last_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
