"""Method fidelity at equal wall-clock, on the CPU: one table of every method.

    python benchmarks/methods.py [--seconds 30] [--base-seconds 90]

1. A base model: `budgetune train demo` for --base-seconds (tiny Llama pre-trained on the
   standard library's sources).
2. A chat instruction set from the standard library (docstring → function, 1,000 examples).
3. Each method fine-tunes the base on it within the same time budget (same data, seq_len
   512, micro-batch 8). Columns: held-out loss after, peak process memory (RSS high-water),
   optimizer-state bytes (measured: the size of the final checkpoint's optimizer.pt),
   trainable parameters, tokens/s (median step).
4. REX vs linear schedule for LoRA at a small budget (--seconds / 3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = [
    # (label, method options, optimizer options)
    ("full / adamw", {"name": "full"}, {"name": "adamw", "lr": 5e-4}),
    ("full / adamw_fp8", {"name": "full"}, {"name": "adamw_fp8", "lr": 5e-4}),
    ("full / galore r32", {"name": "full"}, {"name": "galore", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0}),
    ("full / frugal svd r32", {"name": "full"}, {"name": "frugal", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0, "sign_lr_ratio": 0.1}),
    ("full / lomo", {"name": "full"}, {"name": "lomo", "lr": 2e-2}),
    ("lisa γ=1 K=10", {"name": "lisa", "layers": 1, "interval": 10}, {"name": "adamw", "lr": 5e-4}),
    ("lora r16", {"name": "lora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("rslora r16", {"name": "rslora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("dora r16", {"name": "dora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("loraplus r16", {"name": "loraplus", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("tied-lora r16", {"name": "tied-lora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("vera r64", {"name": "vera", "r": 64}, {"name": "adamw", "lr": 1e-2}),
    ("ia3", {"name": "ia3"}, {"name": "adamw", "lr": 1e-2}),
    ("miss r16", {"name": "miss", "r": 16}, {"name": "adamw", "lr": 2e-3}),
]


def run(cfg: dict, out: Path) -> dict:
    path = out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-c", f"import json, budgetune; budgetune.train(json.load(open({str(path)!r})), quiet=True)"],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    summary["optimizer_state_bytes"] = (ckpt / "optimizer.pt").stat().st_size
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--base-seconds", type=float, default=90)
    ap.add_argument("--work", help="work folder (reuses its base model if present)")
    args = ap.parse_args()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-methods-"))
    if not (tmp / "base" / "model").exists():
        subprocess.run([sys.executable, "-m", "budgetune", "train", "demo", "--budget.time", f"{args.base_seconds}s",
                        "--output.dir", str(tmp / "base"), "--quiet", "--overwrite"], check=True)
    from budgetune.data.corpora import stdlib_chat

    chat = stdlib_chat(tmp / "chat.jsonl", limit=1000)

    def config(label, method, optim, seconds, schedule="cosine"):
        return {
            "model": {"name": str(tmp / "base" / "model")},
            "data": {"train": [str(chat)], "seq_len": 512, "eval_fraction": 0.05, "cache_dir": str(tmp / "cache")},
            "method": method, "optim": {**optim, "weight_decay": 0.0}, "schedule": {"name": schedule, "warmup": 0.05},
            "budget": {"time": f"{seconds}s"}, "train": {"micro_batch": 8, "seed": 0},
            "eval": {"every": None, "max_tokens": 16384}, "checkpoint": {"every": None},
            "output": {"dir": str(tmp / "runs" / label.replace(" ", "_").replace("/", "-")), "overwrite": True},
        }

    rows = []
    for label, method, optim in RUNS:
        s = run(config(label, method, optim, args.seconds), Path(config(label, method, optim, args.seconds)["output"]["dir"]))
        rows.append({"method": label, "eval_loss": s["eval_loss_after"], "loss_before": s["eval_loss_before"],
                     "peak_mb": s["peak_memory_mb"], "state_mb": s["optimizer_state_bytes"] / 2**20,
                     "trainable": s["trainable_parameters"], "tokens_per_s": s["train_tokens_per_s_median"], "steps": s["steps"]})
        print(json.dumps(rows[-1]), flush=True)
    small = args.seconds / 3
    schedules = {}
    for name in ("rex", "linear"):
        cfg = config(f"lora-{name}", {"name": "lora", "r": 16}, {"name": "adamw", "lr": 2e-3}, small, schedule=name)
        schedules[name] = run(cfg, Path(cfg["output"]["dir"]))["eval_loss_after"]

    print(f"\nequal budget {args.seconds:.0f} s per method; base {args.base_seconds:.0f} s demo pre-training; "
          f"held-out loss of the base on the chat set: {rows[0]['loss_before']:.3f}\n")
    print("| method | held-out loss | peak memory MB | optimizer state MB | trainable | tokens/s | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['eval_loss']:.3f} | {r['peak_mb']:.0f} | {r['state_mb']:.2f} | {r['trainable']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['steps']} |")
    print(f"\nLoRA at {small:.0f} s: REX {schedules['rex']:.3f} vs linear {schedules['linear']:.3f}")


if __name__ == "__main__":
    main()
