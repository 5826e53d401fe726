"""The planner on a real model: SmolLM2-135M-Instruct (from its GGUF) on the CPU.

    budgetune fetch smollm2-135m-instruct      # once
    python benchmarks/real_model.py [--steps 4] [--json out.json]

For full fine-tuning and LoRA (r=16, all linear layers) at micro-batch 4 × seq_len 256:
`budgetune plan` with its probe (2 timed steps) predicts peak memory and tokens/s; then a real
`budgetune train` of --steps optimizer steps on the stdlib API chat set (the demo chat's data),
in a fresh process, measures them (peak RSS; median tokens/s over the steps after the first).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import yaml

from budgetune.config import load_config
from budgetune.data.corpora import stdlib_api_chat
from budgetune.plan.search import make_plan


def config(work: Path, method: str, steps: int) -> dict:
    train_file, eval_file, _ = stdlib_api_chat(work / "data", heldout=24)
    return {
        "model": {"name": "smollm2-135m-instruct", "gradient_checkpointing": False},
        "data": {"train": [str(train_file)], "eval": [str(eval_file)], "seq_len": 256},
        "method": {"name": method, **({"r": 16, "alpha": 32} if method == "lora" else {})},
        "optim": {"lr": 1e-3 if method == "lora" else 1e-5},
        "budget": {"steps": steps},
        "train": {"micro_batch": 4, "grad_accum": 1},
        "eval": {"every": None, "max_tokens": 1024},
        "checkpoint": {"every": None},
        "output": {"dir": str(work / f"run-{method}"), "overwrite": True, "report": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in ("full", "lora"):
            cfg_dict = config(work, method, args.steps)
            plan = make_plan(load_config(cfg_dict), probe_steps=2, log=lambda m: None)
            best = plan.best
            path = work / f"{method}.yaml"
            path.write_text(yaml.safe_dump(cfg_dict))
            done = subprocess.run([sys.executable, "-m", "budgetune", "train", str(path), "--quiet"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            summary = json.loads((work / f"run-{method}" / "summary.json").read_text())
            row = {"method": method, "recipe": f"mb={best.recipe.micro_batch} seq=256 ckpt={'on' if best.recipe.gradient_checkpointing else 'off'}",
                   "predicted_mb": round(best.memory.total / 2**20), "measured_mb": round(summary["peak_memory_mb"]),
                   "predicted_tokens_per_s": round(best.tokens_per_s, 1), "measured_tokens_per_s": summary["train_tokens_per_s_median"],
                   "parameters": summary["parameters"], "trainable": summary["trainable_parameters"],
                   "eval_loss_before": round(summary["eval_loss_before"], 3), "eval_loss_after": round(summary["eval_loss_after"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nSmolLM2-135M-Instruct (GGUF, dequantised), CPU {platform.machine()}, {date.today()}")
    print("| method | recipe | predicted peak MB | measured peak MB | error | predicted tokens/s (probe) | measured tokens/s | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem_err = 100 * (r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"]
        tps_err = 100 * (r["predicted_tokens_per_s"] - r["measured_tokens_per_s"]) / r["measured_tokens_per_s"]
        print(f"| {r['method']} | {r['recipe']} | {r['predicted_mb']:,} | {r['measured_mb']:,} | {mem_err:+.1f}% | "
              f"{r['predicted_tokens_per_s']:,} | {r['measured_tokens_per_s']:,} | {tps_err:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
