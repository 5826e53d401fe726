"""budgetune against the standard recipe (transformers `Trainer` + peft), same model, data, machine.

    python benchmarks/vs_trainer.py [--work DIR]

(Quality at equal wall-clock against TRL and the Trainer: benchmarks/race.py.)

Every run is its own process (clean peak-memory readings); results print as markdown tables.

The baseline, done as a careful user would with the standard stack:
- the same model (same config, same seeded initial weights), the same tokenizer, the same
  tokenised examples and the same held-out rows as budgetune;
- per-example dynamic padding (DataCollatorForSeq2Seq pads each micro-batch to its longest
  example; labels -100 on padding and on prompts, exactly budgetune's loss mask);
- AdamW with budgetune's LR, betas, weight decay, warmup fraction and micro-batch, cosine
  schedule, clipping 1.0;
- `max_steps` from a throughput guess (`_runs.peer_max_steps`: 8 steps of a throwaway copy, the
  last 5 timed, not charged to its budget), then max_steps = budget / step time; a callback also stops it when the wall-clock budget is up.
  Its budget starts when its datasets are built, like budgetune's (which also pays for data
  preparation, its evals and the final save inside its budget; the baseline's final eval is
  not charged).
Held-out loss of both: budgetune's `heldout_loss` on the same packed held-out rows.

What it measures: throughput — non-padding tokens/s on the chat set, LoRA and full FT, micro-batch 8,
   seq_len 512, 40 s each; peak process memory (RSS high-water) of the same runs, and the
   planner's prediction of budgetune's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import peer_max_steps

HERE = Path(__file__).resolve()


def peak_rss_bytes() -> int:
    from budgetune.metrics import peak_rss_bytes as peak

    return peak()


# --- the baseline, run inside its own process ------------------------------------------------------


def run_trainer(spec: dict) -> dict:
    """HF Trainer on the examples budgetune prepared; returns its measurements."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from budgetune.config import load_config
    from budgetune.console import quiet_libraries
    from budgetune.data import prepare_data
    from budgetune.evaluate import heldout_loss
    from budgetune.methods import get_method
    from budgetune.models import load_model, load_tokenizer

    quiet_libraries()
    cfg = load_config(spec["config"])
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg, tokenizer, torch.device("cpu"), frozen_base=method.adapter)
    model = method.prepare(model, cfg.method)
    started = time.monotonic()
    cfg.data.pack = False  # one example per row: the baseline pads each micro-batch instead
    data = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=lambda m: None)
    rows = data.train
    examples = []
    for i in range(len(rows)):
        n = int(rows.attention_mask[i].sum())
        examples.append({"input_ids": rows.input_ids[i, :n].tolist(), "labels": rows.labels[i, :n].tolist()})

    counted = {"tokens": 0}
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")

    def collate(features):
        batch = pad(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Stop(TrainerCallback):
        def __init__(self, at: float):
            self.at = at

        def on_step_end(self, args, state, control, **kw):
            if time.monotonic() - started >= self.at:
                control.should_training_stop = True

    def arguments(max_steps: int, out: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=out, max_steps=max_steps, per_device_train_batch_size=cfg.train.micro_batch,
            gradient_accumulation_steps=cfg.train.grad_accum, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps, max_grad_norm=1.0,
            lr_scheduler_type="cosine", warmup_steps=int(cfg.schedule.warmup * max_steps), use_cpu=True, report_to="none",
            save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=cfg.train.seed,
            dataloader_num_workers=0, remove_unused_columns=False)

    budget = spec.get("seconds")
    max_steps = spec.get("steps")
    with tempfile.TemporaryDirectory() as out:
        if max_steps is None:  # the throughput guess on a throwaway copy, not charged to the budget
            import copy

            max_steps, probe_s = peer_max_steps(budget, lambda n: Trainer(model=copy.deepcopy(model), args=arguments(n, out),
                                                                          train_dataset=examples, data_collator=collate))
            started += probe_s
        counted["tokens"] = 0
        trainer = Trainer(model=model, args=arguments(max_steps, out), train_dataset=examples, data_collator=collate,
                          callbacks=[Stop(budget)] if budget else [])
        t0 = time.monotonic()
        result = trainer.train()
        train_s = time.monotonic() - t0
    elapsed = time.monotonic() - started
    model.eval()
    loss = heldout_loss(model, data.eval, cfg.train.micro_batch, cfg.eval.max_tokens, torch.device("cpu"))
    return {
        "eval_loss": loss, "steps": result.global_step, "max_steps": max_steps, "finished_schedule": result.global_step >= max_steps,
        "elapsed_s": elapsed, "train_s": train_s, "tokens": counted["tokens"], "tokens_per_s": counted["tokens"] / train_s,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def run_budgetune(spec: dict) -> dict:
    import budgetune

    summary = budgetune.train(spec["config"], quiet=True)
    events = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {
        "eval_loss": summary["eval_loss_after"], "steps": summary["steps"], "elapsed_s": summary["elapsed_s"],
        "tokens": summary["tokens"], "tokens_per_s": summary["train_tokens_per_s_median"],
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "predicted_mb": (summary.get("predicted") or {}).get("peak_memory_mb"),
        "evals": [(e["seconds"], e["eval_loss"]) for e in events if e.get("event") == "eval"],
    }


def in_process(kind: str, spec: dict) -> dict:
    """Run one side in a fresh process; its JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    done = subprocess.run([sys.executable, str(HERE), f"_{kind}", f.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparisons ----------------------------------------------------------------------------------


def base_config(work: Path, files: list[str], **over) -> dict:
    cfg = {
        "data": {"train": files, "seq_len": 256, "eval_fraction": 0.05, "cache_dir": str(work / "cache")},
        "optim": {"lr": 2e-3, "weight_decay": 0.1}, "schedule": {"name": "cosine", "warmup": 0.05},
        "train": {"micro_batch": 16, "seed": 0}, "eval": {"every": 0.1, "max_tokens": 16384}, "checkpoint": {"every": None},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def throughput(work: Path, seconds: float = 40) -> list[dict]:
    from budgetune.data.corpora import stdlib_chat

    chat = str(stdlib_chat(work / "chat.jsonl", limit=1000))
    out = []
    for method in ("lora", "full"):
        cfg = base_config(work, [chat], model={"init": "scratch", "preset": "llama-tiny"}, tokenizer={"train_vocab_size": 2048},
                          data={"seq_len": 512}, method={"name": method}, train={"micro_batch": 8},
                          eval={"every": None, "max_tokens": 4096}, optim={"lr": 1e-3},
                          plan={"auto": False})  # the same micro-batch on both sides
        ours = in_process("budgetune", {"config": {**cfg, "budget": {"time": f"{seconds}s"},
                                                   "output": {"dir": str(work / "runs" / f"tp-{method}"), "overwrite": True}}})
        theirs = in_process("trainer", {"config": {**cfg, "budget": {"time": f"{seconds}s"}, "output": {"dir": str(work / "unused")}},
                                        "seconds": seconds})
        out.append({"method": method, "ours": ours, "theirs": theirs})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("_trainer", "_budgetune"):
        spec = json.loads(Path(sys.argv[2]).read_text())
        result = (run_trainer if sys.argv[1] == "_trainer" else run_budgetune)(spec)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="throughput")
    ap.add_argument("--work", help="work folder (reuses its base model and caches)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-vs-trainer-"))
    parts = args.parts.split(",")
    if "throughput" in parts:
        rows = throughput(work)
        print("\n| method | baseline tokens/s | budgetune tokens/s | ratio | baseline peak MB | budgetune peak MB | ratio | planner's prediction MB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            t, o = r["theirs"], r["ours"]
            print(f"| {r['method']} | {t['tokens_per_s']:,.0f} | {o['tokens_per_s']:,.0f} | {o['tokens_per_s'] / t['tokens_per_s']:.2f}× | "
                  f"{t['peak_rss_mb']:,.0f} | {o['peak_rss_mb']:,.0f} | {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}× | "
                  f"{o['predicted_mb'] or 0:,.0f} |")


if __name__ == "__main__":
    main()
