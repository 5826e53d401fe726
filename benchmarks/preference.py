"""Preference tuning on a real model, on the CPU: budgetune DPO against TRL's DPOTrainer at equal
wall-clock, and budgetune ORPO and SimPO (docs/benchmarks.md, "Preference tuning").

    python benchmarks/preference.py [--model DIR] [--seconds 100] [--out DIR] [--skip trl,orpo,simpo,layout]

The data no tool was tuned on: the Python standard library's own functions. The prompt is a
function's docstring ("Write `name` (module): ..."), the chosen answer the function's real source,
the rejected one a plausible wrong function: the same first line with the body lines shuffled, or
with the body of another function of similar length. Train and held-out pairs are separate files
(the same for both tools).

The model: SmolLM2-135M-Instruct (`budgetune fetch smollm2-135m-instruct`; --model is its dequantised
folder, by default the one `fetch` cached under ~/.cache/budgetune/gguf/). LoRA r16 on every linear
layer, β 0.1, lr 2e-4 for both tools. TRL takes two pairs per step (padded); budgetune packs
whole pairs into 1,024-token rows, one row per step (~3.7 of these pairs), unless
--pairs-per-step N gives it TRL's shape (one pair per row, N rows per step).

Equal wall-clock: budgetune gets budget.time = --seconds for its whole train command after model
load (planning, data, evals, the final save included); TRL's DPOTrainer is stopped by a callback
once --seconds have passed since `trainer.train()` began (its dataset preparation in the
constructor is not counted: that favours TRL).

Held-out metrics are computed afterwards for every run by the same code (budgetune's
`heldout_metrics` with the DPO objective: reward = β·(log π − log π_ref), π_ref the base model with
the adapter disabled) on the same held-out pairs — so ORPO and SimPO are measured on DPO's implicit
reward too, next to their own. Peak memory is the process's peak RSS.

--layout: packed pairs (several per row) against one pair per row (padded to the longest in the
batch) — budgetune DPO, tokens/s over a fixed number of steps.
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import peer_max_steps, train_in_process  # noqa: E402

SYSTEM = "You write Python functions from their documentation."


def stdlib_pairs(out: Path, n_train: int, n_eval: int, seed: int = 0, max_chars: int = 500) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl of chat-form preference pairs built from the standard library."""
    from budgetune.data.corpora import stdlib_dir

    funcs = []
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc, code = ast.get_docstring(node), ast.get_source_segment(source, node)
            if not doc or not code or len(code) > max_chars or len(doc) < 20:
                continue
            lines = code.splitlines()
            body = [ln for ln in lines[1:] if ln.strip()]
            if len(lines) < 4 or len(body) < 3 or any(ln.rstrip().endswith(("(", ",")) for ln in lines[:1]):
                continue  # one-line signatures and bodies of a few lines, so a shuffle is a real change
            funcs.append({"name": node.name, "module": path.stem, "doc": doc, "code": code, "lines": lines})
    rng = random.Random(seed)
    rng.shuffle(funcs)
    funcs = funcs[: n_train + n_eval]
    records = []
    for i, f in enumerate(funcs):
        head, body = f["lines"][0], f["lines"][1:]
        if i % 2 == 0:  # the body lines shuffled
            wrong = body[:]
            while wrong == body:
                rng.shuffle(wrong)
        else:  # another function's body under this one's first line
            other = funcs[(i + 1 + rng.randrange(len(funcs) - 1)) % len(funcs)]
            wrong = other["lines"][1:]
        rejected = "\n".join([head, *wrong])
        if rejected == f["code"]:
            continue
        user = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Write `{f['name']}` ({f['module']}):\n{f['doc']}"}]
        records.append({"chosen": user + [{"role": "assistant", "content": f["code"]}],
                        "rejected": user + [{"role": "assistant", "content": rejected}]})
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "pairs-train.jsonl", out / "pairs-eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    held.write_text("".join(json.dumps(r) + "\n" for r in records[:n_eval]))
    return train, held


def default_model() -> Path:
    found = sorted((Path.home() / ".cache" / "budgetune" / "gguf").glob("SmolLM2-135M-Instruct*/config.json"))
    if not found:
        raise SystemExit("no SmolLM2-135M-Instruct folder: run `budgetune fetch smollm2-135m-instruct` or pass --model")
    return found[0].parent


def budgetune_config(model: Path, train_file: Path, held: Path, out: Path, objective: dict, seconds: float, seed: int = 0,
                     **sections) -> dict:
    cfg = {
        "model": {"name": str(model)},
        "data": {"train": [str(train_file)], "eval": [str(held)], "seq_len": 1024, "cache_dir": str(out / "cache")},
        "objective": objective,
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "optim": {"lr": 2e-4},
        "schedule": {"name": "cosine", "warmup": 0.05},
        "budget": {"time": f"{seconds}s"},
        "train": {"micro_batch": 1, "batch_tokens": 1024, "seed": seed},
        "eval": {"every": None, "max_tokens": 1024},  # the comparison's held-out metrics are measured after the run
        "checkpoint": {"every": None},
        "plan": {"auto": False},
        "output": {"dir": str(out / f"budgetune-{objective['name']}"), "report": False, "overwrite": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def heldout(model, tokenizer, held: Path, out: Path, pairs: int) -> dict:
    """DPO held-out metrics (β 0.1, adapter disabled = reference) on the first `pairs` held-out pairs."""
    import torch

    from budgetune.config import load_config
    from budgetune.data import prepare_data
    from budgetune.evaluate import heldout_metrics
    from budgetune.objectives import get_objective

    cfg = load_config({"model": {"name": "unused"}, "data": {"train": [str(held)], "eval": [str(held)], "seq_len": 1024,
                                                             "pack": False, "cache_dir": str(out / "cache")},
                       "objective": {"name": "dpo", "beta": 0.1}, "budget": {"steps": 1}})
    rows = prepare_data(cfg, tokenizer, log=lambda m: None).eval
    rows = rows.take(range(min(pairs, len(rows))))  # one pair per row (pack: false)
    return heldout_metrics(model, get_objective(cfg), rows, 2, 10**9, torch.device("cpu"))


def _peak_rss_mb() -> float:
    """The process's peak RSS (VmHWM) since the last `_reset_peak_rss`."""
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Start the peak RSS afresh (Linux: 5 → /proc/self/clear_refs), so a probe that is not part of
    the run does not count in its peak."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def run_trl(model_dir: Path, train: Path, out: Path, seconds: float, seed: int = 0) -> dict:
    """TRL's DPOTrainer with the same LoRA, β, LR and pairs per step, stopped after `seconds` of training."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(train), split="train")

    class StopAt(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            if time.monotonic() - self.t0 >= seconds:
                control.should_training_stop = True

    def make(max_steps: int, m):
        args = DPOConfig(output_dir=str(out / "trl-dpo"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                         learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, max_steps=max_steps, beta=0.1,
                         max_length=512, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                         bf16=False, fp16=False, dataloader_num_workers=0)
        return DPOTrainer(model=m, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))

    # its cosine schedule and 5% warmup need the step count that fits the budget (the probe is not charged)
    max_steps, _ = peer_max_steps(seconds, lambda n: make(n, copy.deepcopy(model)))
    _reset_peak_rss()
    trainer = make(max_steps, model)
    trainer.add_callback(StopAt())
    t0 = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - t0
    tokens = trainer._total_train_tokens if hasattr(trainer, "_total_train_tokens") else None
    trainer.model.save_pretrained(str(out / "trl-dpo" / "adapter"))
    return {"steps": trainer.state.global_step, "max_steps": max_steps, "train_s": round(train_s, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1) if tokens else None, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def evaluate_adapter(model_dir: Path, adapter: Path, held: Path, out: Path, pairs: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)) if adapter is not None else base
    return heldout(model, tokenizer, held, out, pairs)


def child(kind: str, spec: Path) -> None:
    """A part run in its own process (clean peak memory); prints its JSON result."""
    a = json.loads(spec.read_text())
    if kind == "trl":
        result = run_trl(Path(a["model"]), Path(a["train"]), Path(a["out"]), a["seconds"], int(a["seed"]))
    else:
        result = evaluate_adapter(Path(a["model"]), Path(a["adapter"]) if a["adapter"] else None, Path(a["held"]), Path(a["out"]), a["pairs"])
    print("RESULT " + json.dumps(result), flush=True)


def in_child(kind: str, folder: Path, **spec) -> dict:
    path = folder / f"{kind}-{spec.get('tag', '')}.spec.json"
    path.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}))
    done = subprocess.run([sys.executable, __file__, "_child", kind, str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return child(sys.argv[2], Path(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="SmolLM2-135M-Instruct folder (default: fetch's cache)")
    ap.add_argument("--seconds", type=float, default=100.0, help="wall-clock per run")
    ap.add_argument("--pairs", type=int, default=48, help="held-out pairs evaluated")
    ap.add_argument("--train-pairs", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-preference"))
    ap.add_argument("--seed", type=int, default=0, help="train.seed / TRL's seed (data order, adapter init); the pairs stay the same")
    ap.add_argument("--pairs-per-step", type=int, default=None,
                    help="budgetune with this many pairs per optimizer step, one per row (TRL's shape) instead of packed rows")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: trl, orpo, simpo, layout")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model = args.model or default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    train, held = stdlib_pairs(args.out, args.train_pairs, args.pairs)
    print(f"pairs: {sum(1 for _ in open(train))} train, {sum(1 for _ in open(held))} held out; model {model}", flush=True)
    results = {"base": in_child("eval", args.out, tag="base", model=model, adapter=None, held=held, out=args.out, pairs=args.pairs)}
    print("base model (no training):", json.dumps(results["base"]), flush=True)
    runs = [("budgetune DPO", {"name": "dpo", "beta": 0.1})]
    runs += [] if "orpo" in skip else [("budgetune ORPO", {"name": "orpo", "odds_weight": 0.1})]
    runs += [] if "simpo" in skip else [("budgetune SimPO", {"name": "simpo", "beta": 2.0, "gamma": 1.0})]
    for label, objective in runs:
        # --pairs-per-step: TRL's batch shape (one pair per row, padded) instead of packed 1,024-token rows
        # (batch_tokens pinned to those rows, as the packed default pins one row: no planner probe paid from the budget)
        shape = {"data": {"pack": False}, "train": {"micro_batch": args.pairs_per_step, "batch_tokens": args.pairs_per_step * 1024}} \
            if args.pairs_per_step else {}
        s = train_in_process(budgetune_config(model, train, held, args.out, objective, args.seconds, args.seed, **shape),
                             args.out / f"budgetune-{objective['name']}")
        run_dir = Path(s["run_dir"])
        ev = in_child("eval", args.out, tag=objective["name"], model=model, adapter=run_dir / "model", held=held, out=args.out,
                      pairs=args.pairs)
        results[label] = {"steps": s["steps"], "elapsed_s": s["elapsed_s"], "train_s": s["train_steps_s"], "tokens": s["tokens"],
                          "tokens_per_s": s["train_tokens_per_s_median"], "peak_rss_mb": s["peak_memory_mb"],
                          "own_metrics": s.get("preference_eval"), "heldout_dpo": ev}
        print(label, json.dumps(results[label]), flush=True)
    if "trl" not in skip:
        r = in_child("trl", args.out, tag="dpo", model=model, train=train, out=args.out, seconds=args.seconds, seed=args.seed)
        r["heldout_dpo"] = in_child("eval", args.out, tag="trl", model=model, adapter=args.out / "trl-dpo" / "adapter", held=held,
                                    out=args.out, pairs=args.pairs)
        results["TRL DPOTrainer"] = r
        print("TRL DPOTrainer", json.dumps(r), flush=True)
    if "layout" not in skip:
        for pack in (True, False):
            cfg = budgetune_config(model, train, held, args.out, {"name": "dpo"}, args.seconds, budget={"steps": 8, "time": None},
                                   data={"pack": pack}, train={"micro_batch": 1 if pack else 2, "batch_tokens": None},
                                   output={"dir": str(args.out / f"layout-{'packed' if pack else 'padded'}"), "report": False,
                                           "overwrite": True})
            s = train_in_process(cfg, Path(cfg["output"]["dir"]))
            results[f"layout {'packed pairs' if pack else 'one pair per row'}"] = {
                "tokens_per_s": s["train_tokens_per_s_median"], "padding_fraction": s["data"]["padding_fraction"],
                "steps": s["steps"], "train_s": s["train_steps_s"]}
            print("layout", "packed" if pack else "padded", json.dumps(results[f"layout {'packed pairs' if pack else 'one pair per row'}"]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
