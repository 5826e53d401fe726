"""The run's measurements: one JSON object per line in RUN_DIR/metrics.jsonl, and memory readings."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, resident-set high-water on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark.

    Linux: VmHWM from /proc/self/status, the high-water of this program's own memory. Not
    getrusage's ru_maxrss: that one survives fork + exec, so a process started by a large
    parent (a test runner, a notebook) reports the parent's size as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux/BSD report KiB


class MetricsLog:
    """Appends records, one line each, flushed as written (a kill loses at most a torn last
    line, which the next run's log cuts off before appending)."""

    def __init__(self, path: Path | None, tracker=None):
        self._tracker = tracker  # accelerator.log, when experiment trackers are on (main process only)
        if path is not None and path.exists():
            _drop_torn_last_line(path)
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, **record) -> None:
        if self._file is None:
            return
        if self._tracker is not None:
            values = tracker_values(record)
            if values:
                self._tracker(values, step=record["step"])
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",)}


def check_trackers(names: list[str]) -> list[str]:
    """The trackers of `tracking:`, each known to accelerate and importable — else a clear error."""
    import importlib.util

    from .errors import ConfigError

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"config key 'tracking': unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        if not any(importlib.util.find_spec(module) for module in TRACKERS[name]):
            raise ConfigError(f"config key 'tracking': {name!r} needs the {TRACKERS[name][0]} package: pip install {TRACKERS[name][0]}")
    return list(names)


def flat_config(cfg) -> dict:
    """The config as flat dotted keys with scalar values (what trackers' hyper-parameter tables take)."""
    out = {}

    def walk(value, prefix):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(cfg.to_dict(), "")
    return out


def tracker_values(record: dict) -> dict:
    """A metrics.jsonl record as tracker scalars: train/* for steps, eval/loss, and event counts."""
    event = record.get("event")
    if event == "eval":
        return {"eval/loss": record["eval_loss"]}
    if event == "fast_forward":
        return {"fast_forward/repeats": record["repeats"]}
    if event is not None:
        return {}
    keys = ("loss", "lr", "tokens_per_s", "grad_norm", "memory_mb", "tokens", "progress", "epoch")
    return {f"train/{k}": record[k] for k in keys if isinstance(record.get(k), (int, float))}


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: versions, device, cores (for the summary and the report)."""
    import os
    import platform

    import accelerate
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "platform": platform.platform(),
           "cpu_cores": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _drop_torn_last_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
