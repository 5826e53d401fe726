"""Method fidelity at equal wall-clock, on the CPU: one table of every method.

    python benchmarks/methods.py [--seconds 30] [--base-seconds 90] [--data chat,demo]
                                 [--only LABEL,...] [--seeds 0,1] [--work DIR]
    python benchmarks/methods.py --model ~/.cache/budgetune/gguf/SmolLM2-135M-Instruct.Q4_1-*/ --data chat --seconds 90 --only ...

1. A base model: `budgetune train demo` for --base-seconds (tiny Llama pre-trained on the
   standard library's sources).
2. Data: `chat` = an instruction set from the standard library (docstring → function, 1,000
   chats); `demo` = the demo corpus itself (the standard library's sources: continued
   pre-training).
3. Each method fine-tunes the base on it within the same time budget (same data, seq_len
   512, micro-batch 8). Columns: held-out loss after, peak process memory (RSS high-water),
   optimizer-state bytes (measured: the size of the final checkpoint's optimizer.pt),
   trainable parameters, tokens/s (median step).
4. REX vs linear schedule for LoRA at a small budget (--seconds / 3).
5. Fast Forward: LoRA's final loss L after --seconds and its step count S; then LoRA with
   Fast Forward on a budget of S steps, evaluated every S/10 steps: the first step at which
   its held-out loss is ≤ L.

--model fine-tunes a pretrained folder instead of step 1's base (SmolLM2-135M-Instruct as `budgetune
fetch smollm2-135m-instruct` caches it): seq_len 256 and micro-batch 2 so that a 135M model on a
2-core CPU takes tens of steps, evaluation on 4,096 held-out tokens, and the rows' learning rates
scaled to real_models.py's (full-FT optimizers ×0.1 → 5e-5 for AdamW, adapters ×0.5 → 1e-3 for LoRA).

--only runs just the rows whose label is listed (exactly) and skips 4–5; --seeds repeats each
row with those train.seed values (data order, adapter init) and reports each seed's loss and
their mean. Rows are appended to WORK/results-DATA.jsonl, and the table is printed from that
file, so rows from several invocations on the same --work (same base) form one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _runs import train_in_process

RUNS = [
    # (label, method options, optimizer options)
    ("full / adamw", {"name": "full"}, {"name": "adamw", "lr": 5e-4}),
    ("full / adamw_fp8", {"name": "full"}, {"name": "adamw_fp8", "lr": 5e-4}),
    ("full / galore r32", {"name": "full"}, {"name": "galore", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0}),
    ("full / frugal svd r32", {"name": "full"}, {"name": "frugal", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0, "sign_lr_ratio": 0.1}),
    ("full / galore r32 layer-wise", {"name": "full"}, {"name": "galore", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0,
                                                          "layerwise": True}),
    ("full / adamw8bit", {"name": "full"}, {"name": "adamw8bit", "lr": 5e-4}),
    ("full / lomo", {"name": "full"}, {"name": "lomo", "lr": 2e-2}),
    ("freeze top-2", {"name": "freeze", "layers": 2}, {"name": "adamw", "lr": 5e-4}),
    ("lisa γ=1 K=10", {"name": "lisa", "layers": 1, "interval": 10}, {"name": "adamw", "lr": 5e-4}),
    ("lora r16", {"name": "lora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("rslora r16", {"name": "rslora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("dora r16", {"name": "dora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("loraplus r16", {"name": "loraplus", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("pissa r16", {"name": "pissa", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("adalora r12→8", {"name": "adalora", "init_r": 12, "target_r": 8}, {"name": "adamw", "lr": 2e-3}),
    ("tied-lora r16", {"name": "tied-lora", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    ("vera r64", {"name": "vera", "r": 64}, {"name": "adamw", "lr": 1e-2}),
    ("ia3", {"name": "ia3"}, {"name": "adamw", "lr": 1e-2}),
    ("miss r16", {"name": "miss", "r": 16}, {"name": "adamw", "lr": 2e-3}),
    # second round (issue 20): full-FT optimizers at the learning rate of the rows above
    ("full / apollo r32", {"name": "full"}, {"name": "apollo", "lr": 5e-4, "rank": 32, "update_gap": 50}),
    ("full / apollo_mini", {"name": "full"}, {"name": "apollo_mini", "lr": 5e-4, "update_gap": 50}),
    ("full / gum r32", {"name": "full"}, {"name": "gum", "lr": 5e-4, "rank": 32, "update_gap": 50, "density": 0.25}),
    ("full / natural_galore r32", {"name": "full"}, {"name": "natural_galore", "lr": 5e-4, "rank": 32, "update_gap": 50, "scale": 1.0,
                                                     "history": 10}),
    ("badam K=10", {"name": "badam", "interval": 10}, {"name": "adamw", "lr": 5e-4}),
    ("full / sgd", {"name": "full"}, {"name": "sgd", "lr": 2e-2}),
    ("mos r16 (params of r2)", {"name": "mos", "r": 16, "pool_rank": 1, "private": 1, "shards": 4}, {"name": "adamw", "lr": 2e-3}),
    ("lora r2", {"name": "lora", "r": 2}, {"name": "adamw", "lr": 2e-3}),
    ("increlora r1→8 (max 16)", {"name": "increlora", "init_r": 1, "target_r": 8, "max_r": 16}, {"name": "adamw", "lr": 2e-3}),
]


def run(cfg: dict, out: Path) -> dict:
    summary = train_in_process(cfg, out)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    summary["optimizer_state_bytes"] = (ckpt / "optimizer.pt").stat().st_size
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--base-seconds", type=float, default=90)
    ap.add_argument("--work", help="work folder (reuses its base model if present)")
    ap.add_argument("--data", default="chat,demo", help="comma-separated: chat, demo")
    ap.add_argument("--only", help="comma-separated row labels to run (skips the REX and Fast Forward extras)")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values, one run each")
    ap.add_argument("--model", help="a pretrained model folder to fine-tune instead of the demo-trained base")
    ap.add_argument("--steps", type=int, help="an equal number of optimizer steps per row instead of equal seconds "
                                               "(with --only; results go to results-DATA-stepsN.jsonl)")
    args = ap.parse_args()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-methods-"))
    if not args.model and not (tmp / "base" / "model").exists():
        subprocess.run([sys.executable, "-m", "budgetune", "train", "demo", "--budget.time", f"{args.base_seconds}s",
                        "--output.dir", str(tmp / "base"), "--quiet", "--overwrite"], check=True)
    for data in args.data.split(","):
        table(tmp, data, args)


def table(tmp: Path, data: str, args) -> None:
    from budgetune.config import load_config
    from budgetune.data.corpora import stdlib_chat

    if data == "chat":
        train_files = [str(stdlib_chat(tmp / "chat.jsonl", limit=1000))]
    else:  # the demo config's own corpus (the standard library's sources)
        train_files = load_config("demo").data.train

    real = bool(args.model)  # a 135M model on a 2-core CPU: shorter rows, fewer of them per step, a smaller eval

    def config(label, method, optim, seconds, schedule="cosine", budget=None, train=None, every=None, seed=0):
        if real:  # real_models.py's learning rates: full-FT optimizers at a tenth, adapters at half the tiny base's
            optim = {**optim, "lr": optim["lr"] * (0.1 if method["name"] in ("full", "freeze", "lisa", "badam") else 0.5)}
        return {
            "model": {"name": args.model or str(tmp / "base" / "model")},
            # chat: 20% held out, so the 32 evaluated rows and Fast Forward's 4 judging rows never overlap
            "data": {"train": train_files, "seq_len": 256 if real else 512, "eval_fraction": 0.2 if data == "chat" else 0.05,
                     "cache_dir": str(tmp / "cache")},
            "method": method, "optim": {**optim, "weight_decay": 0.0}, "schedule": {"name": schedule, "warmup": 0.05},
            "budget": budget or {"time": f"{seconds}s"}, "train": {"micro_batch": 2 if real else 8, "seed": seed, **(train or {})},
            "eval": {"every": every, "max_tokens": 4096 if real else 16384}, "checkpoint": {"every": None},
            "output": {"dir": str(tmp / "runs" / data / label.replace(" ", "_").replace("/", "-")), "overwrite": True},
        }

    only = args.only.split(",") if args.only else None
    unknown = set(only or ()) - {label for label, _, _ in RUNS}
    if unknown:
        raise SystemExit(f"--only: no rows named {sorted(unknown)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    results = tmp / (f"results-{data}-steps{args.steps}.jsonl" if args.steps else f"results-{data}.jsonl")
    rows = []
    for label, method, optim in RUNS:
        if only and label not in only:
            continue
        for seed in seeds:
            name = label if seed == 0 else f"{label} seed{seed}"
            cfg = config(name, method, optim, args.seconds, seed=seed, budget={"steps": args.steps} if args.steps else None)
            if args.steps:
                cfg["output"]["dir"] += f"-steps{args.steps}"
            s = run(cfg, Path(cfg["output"]["dir"]))
            rows.append({"method": label, "seed": seed, "eval_loss": s["eval_loss_after"], "loss_before": s["eval_loss_before"],
                         "peak_mb": s["peak_memory_mb"], "state_mb": s["optimizer_state_bytes"] / 2**20,
                         "trainable": s["trainable_parameters"], "tokens_per_s": s["train_tokens_per_s_median"], "steps": s["steps"],
                         "seconds": args.seconds, "budget_steps": args.steps, "elapsed_s": s["elapsed_s"], "lr": cfg["optim"]["lr"]})
            with open(results, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    if only:
        print_seeded_table(results, data, args)
        return
    small = args.seconds / 3
    schedules = {}
    for name in ("rex", "linear"):
        cfg = config(f"lora-{name}", {"name": "lora", "r": 16}, {"name": "adamw", "lr": 2e-3}, small, schedule=name)
        schedules[name] = run(cfg, Path(cfg["output"]["dir"]))["eval_loss_after"]

    # Fast Forward: steps LoRA + FF needs to reach plain LoRA's final loss
    lora = next(r for r in rows if r["method"] == "lora r16")
    cfg = config("lora-ff", {"name": "lora", "r": 16}, {"name": "adamw", "lr": 2e-3}, None, budget={"steps": lora["steps"]},
                 train={"fast_forward": 5, "fast_forward_rows": 4}, every=0.1)
    ff = run(cfg, Path(cfg["output"]["dir"]))
    events = [json.loads(line) for line in (Path(cfg["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    reached = next((e["step"] for e in events if e.get("event") == "eval" and e["eval_loss"] <= lora["eval_loss"]), None)

    print(f"\n{data}: equal budget {args.seconds:.0f} s per method; base {args.base_seconds:.0f} s demo pre-training; "
          f"held-out loss of the base on this data: {rows[0]['loss_before']:.3f}\n")
    print("| method | held-out loss | peak memory MB | optimizer state MB | trainable | tokens/s | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['eval_loss']:.3f} | {r['peak_mb']:.0f} | {r['state_mb']:.2f} | {r['trainable']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['steps']} |")
    print(f"\nLoRA at {small:.0f} s: REX {schedules['rex']:.3f} vs linear {schedules['linear']:.3f}")
    print(f"Fast Forward (every 5 steps, 4 held-out rows): LoRA's final loss {lora['eval_loss']:.3f} after {lora['steps']} steps; "
          f"LoRA + FF reached it at step {reached} (of {lora['steps']}; evaluated every {max(1, lora['steps'] // 10)} steps), "
          f"final {ff['eval_loss_after']:.3f} after {ff['steps']} steps and {ff['fast_forward_repeats']} repeats in {ff['elapsed_s']:.0f} s")


def print_seeded_table(results: Path, data: str, args) -> None:
    """One row per method from every run recorded in `results`: each seed's loss and the means."""
    runs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    seeds = sorted({r["seed"] for r in runs})
    before = runs[0]["loss_before"]
    budget = f"{runs[0]['budget_steps']} optimizer steps" if runs[0].get("budget_steps") else f"{runs[0]['seconds']:.0f} s"
    print(f"\n{data}: equal budget {budget} per run; held-out loss of the base on this data: {before:.3f}\n")
    print("| method | lr | " + " | ".join(f"loss seed {s}" for s in seeds)
          + " | mean loss | peak memory MB | optimizer state MB | trainable | steps | seconds |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for method, rs in by_method.items():
        loss = {r["seed"]: r["eval_loss"] for r in rs}
        print(f"| {method} | {rs[0]['lr']:g} | " + " | ".join(f"{loss[s]:.3f}" if s in loss else "—" for s in seeds)
              + f" | {mean(list(loss.values())):.3f} | {mean([r['peak_mb'] for r in rs]):.0f} | {mean([r['state_mb'] for r in rs]):.2f} | "
              f"{rs[0]['trainable']:,} | {mean([r['steps'] for r in rs]):.0f} | {mean([r['elapsed_s'] for r in rs]):.0f} |")


if __name__ == "__main__":
    main()
