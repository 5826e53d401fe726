"""Planner accuracy: predicted vs measured peak memory of a training step on CPU.

    python benchmarks/planner_accuracy.py [--quick] [--glibc-default] [--json out.json]

About 3 minutes on 2 CPU cores; about 9 with --glibc-default.

For every grid point (3 architectures × full FT / LoRA × checkpointing on/off × several
micro-batch and sequence lengths, random-init models of 18–28M parameters) it runs two
real training steps in a fresh process (`budgetune.plan.measure.measure_step_memory`) and
compares the step's peak RSS above the post-import baseline with
`estimate_memory(...).step_bytes` — the formula only, fed nothing measured but the baseline
(which `step_bytes` leaves out anyway). No per-point fitting.

Each point is measured with glibc's mmap threshold pinned (RSS then follows the live
tensors; see measure.py). With --glibc-default each point is measured a second time under
glibc's default dynamic threshold — what a process that does not pin it sees, `train`
included — and compared with the prediction the planner prints on the CPU:
`with_allocator(estimate)`, the live tensors plus the `allocator` term (what glibc keeps
of freed transient tensors; its per-class ratios were fitted on this grid). Errors are given
for the step alone and for the whole process (step + post-import baseline: the RSS a user sees).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

from transformers import CONFIG_MAPPING

from budgetune.plan.measure import measure_step_memory
from budgetune.plan.memory import estimate_memory, with_allocator
from budgetune.plan.recipe import Recipe

MODELS = {
    # ~25.6M parameters, GQA 8/4
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
    # ~18M parameters, GQA 6/2, tied embeddings
    "qwen2": dict(model_type="qwen2", hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=12000, tie_word_embeddings=True),
    # ~27M parameters, parallel residual, partial rotary
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                     num_attention_heads=8, vocab_size=8000),
}

GRID: list[tuple[str, Recipe]] = [
    ("llama", Recipe(micro_batch=4, seq_len=256)),
    ("llama", Recipe(micro_batch=4, seq_len=256, gradient_checkpointing=True)),
    ("llama", Recipe(method="lora", micro_batch=4, seq_len=256)),
    ("llama", Recipe(method="lora", micro_batch=8, seq_len=512, gradient_checkpointing=True)),
    ("llama", Recipe(micro_batch=2, seq_len=1024)),
    ("llama", Recipe(micro_batch=8, seq_len=128, packed=False)),
    ("llama", Recipe(micro_batch=4, seq_len=256, optimizer="sgd")),
    ("qwen2", Recipe(micro_batch=4, seq_len=512)),
    ("qwen2", Recipe(micro_batch=4, seq_len=512, gradient_checkpointing=True)),
    ("qwen2", Recipe(method="lora", micro_batch=8, seq_len=256)),
    ("qwen2", Recipe(method="lora", micro_batch=2, seq_len=1024, gradient_checkpointing=True)),
    ("gpt_neox", Recipe(micro_batch=4, seq_len=256)),
    ("gpt_neox", Recipe(micro_batch=8, seq_len=256, gradient_checkpointing=True)),
    ("gpt_neox", Recipe(method="lora", micro_batch=4, seq_len=512)),
    ("gpt_neox", Recipe(micro_batch=2, seq_len=512, packed=False, grad_accum=2)),
]


def label(arch: str, r: Recipe) -> str:
    parts = [arch, r.method + (f" r{r.lora_r}" if r.method == "lora" else ""), f"B{r.micro_batch}×T{r.seq_len}"]
    if r.grad_accum > 1:
        parts.append(f"accum {r.grad_accum}")
    parts.append("ckpt" if r.gradient_checkpointing else "no ckpt")
    parts.append("packed" if r.packed else "padded")
    if r.optimizer != "adamw":
        parts.append(r.optimizer)
    return ", ".join(parts)


def build_config(d: dict):
    d = dict(d)
    return CONFIG_MAPPING[d.pop("model_type")](**d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="first 4 points only")
    ap.add_argument("--glibc-default", action="store_true", help="also measure under glibc's default mmap threshold")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-speed", action="store_true", help="skip the tokens/s part (benchmarks/planner_speed.py)")
    args = ap.parse_args(argv)

    grid = GRID[:4] if args.quick else GRID
    rows = []
    started = time.monotonic()
    for arch, recipe in grid:
        config = build_config(MODELS[arch])
        pinned = measure_step_memory(MODELS[arch], recipe)
        estimate = estimate_memory(config, recipe, "cpu", overhead_bytes=pinned["baseline_bytes"])
        default = measure_step_memory(MODELS[arch], recipe, allocator="default") if args.glibc_default else None
        predicted = estimate.step_bytes
        row = {
            "config": label(arch, recipe), "params_m": round(estimate.parameters / 1e6, 1),
            "trainable_m": round(estimate.trainable / 1e6, 2), "peak_at": estimate.peak_at,
            "predicted_mb": predicted / 2**20, "measured_mb": pinned["peak_bytes"] / 2**20,
            "error_pct": 100.0 * (predicted - pinned["peak_bytes"]) / pinned["peak_bytes"],
            "baseline_mb": pinned["baseline_bytes"] / 2**20, "step_s": pinned["step_seconds"],
        }
        if default is not None:
            held = with_allocator(estimate, recipe, "cpu").step_bytes
            base = default["baseline_bytes"]
            row.update(default_mb=default["peak_bytes"] / 2**20, default_step_s=default["step_seconds"],
                       allocator_predicted_mb=held / 2**20,
                       default_error_pct=100.0 * (held - default["peak_bytes"]) / default["peak_bytes"],
                       default_process_error_pct=100.0 * (held - default["peak_bytes"]) / (default["peak_bytes"] + base),
                       live_only_process_error_pct=100.0 * (predicted - default["peak_bytes"]) / (default["peak_bytes"] + base))
        rows.append(row)
        print(f"  {row['config']}: predicted {row['predicted_mb']:.0f} MB, measured {row['measured_mb']:.0f} MB "
              f"({row['error_pct']:+.1f}%)", flush=True)

    print()
    print(f"CPU {platform.machine()}, {__import__('os').cpu_count()} cores, {date.today().isoformat()}, "
          f"{len(rows)} points in {time.monotonic() - started:.0f} s")
    print()
    head = "| config | params (trainable) | predicted MB | measured MB | error % | peak at |"
    sep = "|---|---|---|---|---|---|"
    if rows and "default_mb" in rows[0]:
        head += " predicted MB with allocator | measured MB, glibc default | error % (step) | error % (process) | live tensors only: error % (process) |"
        sep += "---|---|---|---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['config']} | {r['params_m']}M ({r['trainable_m']}M) | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} "
                f"| {r['error_pct']:+.1f} | {r['peak_at']} |")
        if "default_mb" in r:
            line += (f" {r['allocator_predicted_mb']:.0f} | {r['default_mb']:.0f} | {r['default_error_pct']:+.1f} "
                     f"| {r['default_process_error_pct']:+.1f} | {r['live_only_process_error_pct']:+.1f} |")
        print(line)
    print()
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"max |error| (pinned mmap threshold): {worst:.1f}%  — {'all' if worst <= 15 else 'NOT all'} points within ±15%")
    if rows and "default_mb" in rows[0]:
        print(f"max |error| of the printed CPU prediction vs glibc-default RSS: step {max(abs(r['default_error_pct']) for r in rows):.1f}%, "
              f"whole process {max(abs(r['default_process_error_pct']) for r in rows):.1f}% "
              f"(live tensors alone: {max(abs(r['live_only_process_error_pct']) for r in rows):.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if not args.no_speed:
        print("\ntokens/s after calibration (benchmarks/planner_speed.py):\n", flush=True)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import planner_speed

        planner_speed.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
