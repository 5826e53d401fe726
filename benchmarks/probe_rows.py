"""The planner's one-step speed probe on unpacked short rows: planning time and peak memory.

    python benchmarks/probe_rows.py                            # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/probe_rows.py  # another version, for before/after

With `data.pack: false`, chat examples of ~60–110 tokens and `data.seq_len: 1024`, the batch left
to the planner and a time budget, `train` plans with a one-step probe of the top recipe
(llama-tiny from scratch, 2.6M parameters, micro-batch 8). The tokenizer and the tokenised data
are made first and not timed (a run's data preparation does that anyway; the planner reads the
cache), then `plan_for_training` is timed, and the process's RSS high-water mark (VmHWM, reset
right before) is read after it: the planner's own peak above the process as it stood.
One process per invocation, so nothing of an earlier measurement is in the number.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import write_chat_jsonl  # noqa: E402  (the tests' data generator)


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> dict:
    import budgetune
    from budgetune.config import load_config
    from budgetune.data import prepare_data
    from budgetune.models import load_tokenizer
    from budgetune.plan.search import plan_for_training

    tmp = Path(tempfile.mkdtemp(prefix="budgetune-probe-rows-"))
    data = write_chat_jsonl(tmp / "chat.jsonl", n=400)
    cfg = load_config({
        "model": {"init": "scratch", "preset": "llama-tiny"},
        "tokenizer": {"train_vocab_size": 2048},
        "data": {"train": [str(data)], "seq_len": 1024, "pack": False, "cache_dir": str(tmp / "cache")},
        "train": {"micro_batch": 8},  # a memory detail: the planner still chooses the batch
        "budget": {"time": "120s"},
        "output": {"dir": str(tmp / "run")},
    })
    bundle = prepare_data(cfg, load_tokenizer(cfg, log=lambda m: None), log=lambda m: None)  # caches, untimed
    lines: list[str] = []
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    before = _rss()
    started = time.perf_counter()
    planned, prediction = plan_for_training(cfg, log=lines.append)
    seconds = time.perf_counter() - started
    lengths = bundle.train.real_tokens
    return {"budgetune": str(Path(budgetune.__file__).parent), "plan_seconds": round(seconds, 2),
            "plan_peak_mb": round((_hwm() - before) / 2**20, 1), "rss_before_mb": round(before / 2**20, 1),
            "rows": len(lengths), "mean_row": round(float(lengths.mean()), 1), "longest_row": int(lengths.max()),
            "measured_tokens_per_s": prediction.get("measured_tokens_per_s") if prediction else None,
            "rows_per_step": planned.train.micro_batch * planned.train.grad_accum,
            "log": [line for line in lines if line.startswith(("probe", "planner"))]}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
