"""Core measurements (issue: the core): demo learning, time-budget overshoot, padding saved by packing.

    python benchmarks/core.py [--budget 60s] [--skip-demo]

1. `budgetune demo` (3-minute budget): held-out loss before/after vs ln(V), tokens/s.
2. `budgetune train demo --budget.time 60s` as a subprocess: wall time from the moment the
   budget clock starts (after model load) to the end of the process, against the budget.
3. Padding on a chat-format JSONL (the stdlib docstring → function set): padding-free packing
   vs per-micro-batch dynamic padding (the Trainer default), same tokenizer and seq_len.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def run_demo(out: Path) -> dict:
    from budgetune.demo import demo

    return demo(["--output.dir", str(out / "demo")], quiet=True)


def time_budget(out: Path, budget: str) -> dict:
    run = out / "budget"
    cmd = [sys.executable, "-m", "budgetune", "train", "demo", "--budget.time", budget, "--output.dir", str(run), "--quiet"]
    subprocess.run(cmd, check=True)
    ended = time.time()
    summary = json.loads((run / "summary.json").read_text())
    from budgetune.units import parse_duration

    limit = parse_duration(budget)
    whole = ended - summary["started_at"]
    return {"budget_s": limit, "train_elapsed_s": summary["elapsed_s"], "command_after_load_s": round(whole, 2),
            "overshoot_s": round(whole - limit, 2), "tolerance_s": max(0.02 * limit, 5.0), "steps": summary["steps"]}


def padding(out: Path, seq_len: int = 1024, micro_batch: int = 8) -> dict:
    from budgetune.config import load_config
    from budgetune.data import build_rows, prepare_data
    from budgetune.data.corpora import stdlib_chat
    from budgetune.models import load_tokenizer

    data = stdlib_chat(out / "stdlib_chat.jsonl", limit=2000)
    cfg = load_config({
        "model": {"init": "scratch", "preset": "llama-tiny"},
        "tokenizer": {"train_vocab_size": 4096},
        "data": {"train": [str(data)], "seq_len": seq_len, "eval_fraction": 0.0},
        "budget": {"steps": 1},
    })
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    bundle = prepare_data(cfg, tokenizer, log=lambda m: None)
    packed = bundle.train
    from budgetune.data.tokenize import tokenize_files
    from budgetune.data.sources import resolve

    examples = tokenize_files(resolve(cfg.data.train), tokenizer, cfg.data)
    padded = build_rows(examples, seq_len, pack=False, pad_id=0)
    lengths = padded.real_tokens
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = [lengths[order[i : i + micro_batch]] for i in range(0, len(order), micro_batch)]
    dynamic_total = sum(len(b) * b.max() for b in batches)
    real = int(lengths.sum())
    return {
        "examples": len(lengths), "real_tokens": real, "seq_len": seq_len, "micro_batch": micro_batch,
        "packed_rows": len(packed), "packed_padding": round(packed.padding_fraction, 4),
        "dynamic_padding": round(1 - real / dynamic_total, 4), "fixed_padding": round(1 - real / (len(lengths) * seq_len), 4),
        "token_slots_saved_vs_dynamic": round(1 - packed.input_ids.size / dynamic_total, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="60s")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="budgetune-bench-"))
    results = {"date": str(date.today()), "device": f"CPU {platform.processor() or platform.machine()}", "padding": padding(out)}
    print(json.dumps(results["padding"], indent=2), flush=True)
    results["time_budget"] = time_budget(out, args.budget)
    print(json.dumps(results["time_budget"], indent=2), flush=True)
    if not args.skip_demo:
        s = run_demo(out)
        results["demo"] = {k: s[k] for k in ("eval_loss_before", "eval_loss_after", "uniform_loss", "steps", "tokens", "tokens_per_s", "elapsed_s", "overshoot_s")}
        results["demo"]["train_tokens_per_s_last"] = s["train_tokens_per_s_last"]
        print(json.dumps(results["demo"], indent=2), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
