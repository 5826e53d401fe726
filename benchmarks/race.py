"""The race: budgetune's defaults against the strongest standard peers at equal wall-clock.

    python benchmarks/race.py [--seconds 150] [--seeds 0,1] [--races finetune-full,pretrain,finetune-lora] [--work DIR]
    python benchmarks/race.py --races finetune-full --seconds 90 --sweep train.batch_tokens=512,1024,2048,4096   # a default's check

(Throughput and peak memory with the same recipe on both sides: benchmarks/vs_trainer.py.)

Data nobody tuned for (built from packages installed beside budgetune, so every rerun sees
the same files): fine-tuning = ~5k prompt → completion examples from sympy (prompt: the
function's signature and docstring; completion: its body), seq_len 512; pre-training = the
sources of mpmath, seq_len 512. Models: pre-training trains the `llama-tiny` preset from scratch
with a 4,096-token BPE tokenizer trained on the corpus; fine-tuning starts from the demo base
(`budgetune train demo` for 90 s, cached in the work folder).

Contestants (every one in its own process, the same model and seeded initial weights, tokenizer,
tokenised examples, held-out rows and peak LR (--lr, 3e-4 as in issue 12); peers otherwise with
their documented defaults: batch 8 examples, linear decay, no warmup, Adam β2 0.999, clip 1.0):
- budgetune — `budgetune.train` with the task's config and nothing else set: the planner picks the
  batch, the eval/checkpoint cadence is `auto`, the time budget covers data preparation, evals
  and the final save; and the same with half the wall-clock (does it reach the best peer's loss
  in ≤ 0.5× the budget?);
- TRL `SFTTrainer`, `padding_free=True` (fine-tuning);
- TRL `SFTTrainer`, `packing=True` (BFD packing, fine-tuning);
- transformers `Trainer`, per-example dynamic padding (fine-tuning);
- transformers `Trainer`, concatenate-and-chunk (the run_clm recipe, pre-training).
A peer's `max_steps` comes from the last 5 of 8 steps of a throwaway copy (not charged to its
budget), and a callback stops it when the wall-clock budget is up; its clock starts before its data preparation,
and its final eval is not charged. Every contestant's held-out loss is the same function
(`budgetune.evaluate.heldout_loss`) on the same packed held-out rows.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import peer_max_steps

HERE = Path(__file__).resolve()
EVAL_TOKENS = 32768


# --- data nobody tuned for --------------------------------------------------------------------------


def site_packages() -> Path:
    import sympy

    return Path(sympy.__file__).resolve().parents[1]


def sympy_completions(out: Path, limit: int = 5000, max_chars: int = 2000) -> Path:
    """{"prompt": signature + docstring, "completion": body} for functions of sympy, seeded order."""
    if out.exists():
        return out
    rows = []
    for path in sorted((site_packages() / "sympy").rglob("*.py")):
        if "/tests/" in str(path):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
                continue
            doc_node = node.body[0]
            if len(node.body) < 2 or node.end_lineno - node.lineno > 60:
                continue
            head = "".join(lines[node.lineno - 1:doc_node.end_lineno])
            body = "".join(lines[doc_node.end_lineno:node.end_lineno])
            if 20 <= len(body) <= max_chars and len(head) <= max_chars:
                rows.append({"prompt": head, "completion": body})
    random.Random(0).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:limit]))
    return out


def mpmath_sources() -> list[str]:
    return [str(site_packages() / "mpmath" / "**" / "*.py")]


# --- configs --------------------------------------------------------------------------------------------


def demo_base(work: Path) -> Path:
    base = work / "base"
    if not (base / "model").exists():  # the fine-tuning base: the demo model after 90 s
        subprocess.run([sys.executable, "-m", "budgetune", "train", "demo", "--budget.time", "90s", "--output.dir", str(base),
                        "--quiet", "--overwrite"], check=True)
    return base / "model"


def task_config(work: Path, race: str, lr: float) -> dict:
    """The config a user would write for the task: model, data, seq_len, budget-independent keys only."""
    common = {"data": {"seq_len": 512, "eval_fraction": 0.05, "cache_dir": str(work / "cache")},
              "eval": {"max_tokens": EVAL_TOKENS}, "optim": {"lr": lr}}
    if race == "pretrain":
        return {**common, "model": {"init": "scratch", "preset": "llama-tiny"}, "tokenizer": {"train_vocab_size": 4096},
                "data": {**common["data"], "train": mpmath_sources()}}
    method = race.split("-")[1]
    return {**common, "model": {"name": str(demo_base(work))}, "method": {"name": method},
            "data": {**common["data"], "train": [str(sympy_completions(work / "sympy.jsonl"))]}}


# --- contestants, each inside its own process ----------------------------------------------------------


def _prepared(spec: dict):
    """Model (seeded init, method applied), tokenizer, training examples and the shared held-out rows."""
    import torch

    from budgetune.config import load_config
    from budgetune.console import quiet_libraries
    from budgetune.data import prepare_data
    from budgetune.methods import get_method
    from budgetune.models import load_model, load_tokenizer

    quiet_libraries()
    cfg = load_config(spec["config"])
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)
    model = method.prepare(load_model(cfg, tokenizer, torch.device("cpu"), frozen_base=method.adapter), cfg.method)
    started = time.monotonic()  # the peer's budget starts with its data preparation, like budgetune's
    held_out = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=lambda m: None).eval  # packed, as budgetune's
    cfg.data.pack = False  # one example per row; each peer batches them its own way
    rows = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=lambda m: None).train
    examples = []
    for i in range(len(rows)):
        n = int(rows.attention_mask[i].sum())
        examples.append({"input_ids": rows.input_ids[i, :n].tolist(), "labels": rows.labels[i, :n].tolist()})
    return cfg, model, tokenizer, examples, held_out, started


def concatenate_and_chunk(examples: list[dict], block: int, eos: int) -> list[dict]:
    """run_clm's group_texts: every document + EOS end to end, cut into blocks; the remainder is dropped."""
    stream = [t for e in examples for t in e["input_ids"] + [eos]]
    return [{"input_ids": stream[i:i + block], "labels": stream[i:i + block]} for i in range(0, len(stream) - block + 1, block)]


def run_peer(spec: dict) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from budgetune.evaluate import heldout_loss

    cfg, model, tokenizer, examples, held_out, started = _prepared(spec)
    kind, budget, seed = spec["kind"], spec["seconds"], spec["seed"]
    counted = {"tokens": 0}

    def counting(collate):
        def wrapped(features):
            batch = collate(features)
            # non-padding tokens, prompts included (as budgetune counts): a padding-free batch is one unpadded row
            counted["tokens"] += int(batch["input_ids"].numel()) if "attention_mask" not in batch else int(batch["attention_mask"].sum())
            return batch
        return wrapped

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if time.monotonic() - started >= budget:
                control.should_training_stop = True

    common = dict(per_device_train_batch_size=8, learning_rate=cfg.optim.lr, use_cpu=True, report_to="none",
                  save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=seed,
                  data_seed=seed, dataloader_num_workers=0)
    if kind.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list(examples)

        def make(max_steps: int, out: str, m):
            # the examples are already cut to seq_len (budgetune's data layer); TRL refuses max_length with
            # padding_free unless it packs, so it gets None there
            args = SFTConfig(output_dir=out, max_steps=max_steps, max_length=None if kind == "trl_padding_free" else cfg.data.seq_len,
                             padding_free=kind == "trl_padding_free", packing=kind == "trl_packing", **common)
            trainer = SFTTrainer(model=m, args=args, train_dataset=dataset, processing_class=tokenizer)
            trainer.data_collator = counting(trainer.data_collator)
            return trainer
    else:
        if kind == "trainer_chunked":
            examples = concatenate_and_chunk(examples, cfg.data.seq_len, tokenizer.eos_token_id)
        pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")

        def make(max_steps: int, out: str, m):
            args = TrainingArguments(output_dir=out, max_steps=max_steps, remove_unused_columns=False, **common)
            return Trainer(model=m, args=args, train_dataset=examples, data_collator=counting(pad))

    with tempfile.TemporaryDirectory() as out:
        # the throughput guess, not charged to the budget
        remaining = budget - (time.monotonic() - started)
        max_steps, probe_s = peer_max_steps(remaining, lambda n: make(n, out, copy.deepcopy(model)))
        started += probe_s
        counted["tokens"] = 0
        trainer = make(max_steps, out, model)
        trainer.add_callback(Stop())
        t0 = time.monotonic()
        result = trainer.train()
        train_s = time.monotonic() - t0
    elapsed = time.monotonic() - started
    model.eval()
    loss = heldout_loss(model, held_out, 8, EVAL_TOKENS, torch.device("cpu"))
    return {"eval_loss": loss, "steps": result.global_step, "max_steps": max_steps, "elapsed_s": elapsed,
            "tokens": counted["tokens"], "tokens_per_s": counted["tokens"] / train_s,
            "tokens_per_step": counted["tokens"] / max(1, result.global_step)}


def run_budgetune(spec: dict) -> dict:
    import budgetune

    summary = budgetune.train(spec["config"], quiet=True)
    events = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"eval_loss": summary["eval_loss_after"], "steps": summary["steps"], "elapsed_s": summary["elapsed_s"],
            "tokens": summary["tokens"], "tokens_per_s": summary["train_tokens_per_s_median"],
            "tokens_per_step": summary["tokens"] / max(1, summary["steps"]), "recipe": summary["recipe"],
            "lr": budgetune.load_config(Path(summary["run_dir"]) / "config.yaml").optim.lr,
            "evals": [(e["seconds"], e["eval_loss"]) for e in events if e.get("event") == "eval"]}


def in_process(kind: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    done = subprocess.run([sys.executable, str(HERE), "_run", kind, f.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the races ------------------------------------------------------------------------------------------

PEERS = {"finetune-full": ["trl_padding_free", "trl_packing", "trainer_padded"],
         "finetune-lora": ["trl_padding_free", "trl_packing", "trainer_padded"],
         "pretrain": ["trainer_chunked"]}
NAMES = {"budgetune": "budgetune defaults", "budgetune_half": "budgetune defaults, half the budget", "trl_padding_free": "TRL SFTTrainer, padding_free=True",
         "trl_packing": "TRL SFTTrainer, packing=True", "trainer_padded": "Trainer, dynamic padding",
         "trainer_chunked": "Trainer, concatenate-and-chunk"}


def race(work: Path, name: str, seconds: float, seed: int, lr: float, peers: list[str] | None = None,
         peers_only: bool = False) -> list[dict]:
    cfg = task_config(work, name, lr)
    cfg["train"] = {"seed": seed}
    # tokenise (and train the tokenizer) once before anyone's clock starts: every contestant reads the cache
    in_process("warm", {"config": {**cfg, "budget": {"time": f"{seconds}s"}, "output": {"dir": str(work / "unused")}}})
    out = []
    for kind in ([] if peers_only else ["budgetune", "budgetune_half"]) + (PEERS[name] if peers is None else peers):
        try:
            if kind.startswith("budgetune"):
                t = seconds / 2 if kind == "budgetune_half" else seconds
                result = in_process("budgetune", {"config": {**cfg, "budget": {"time": f"{t}s"},
                                                             "output": {"dir": str(work / "runs" / f"{name}-{seed}-{kind}"), "overwrite": True}}})
            else:
                result = in_process("peer", {"config": {**cfg, "budget": {"time": f"{seconds}s"}, "output": {"dir": str(work / "unused")}},
                                             "kind": kind, "seconds": seconds, "seed": seed})
        except RuntimeError as e:  # a contestant that fails is reported as failed, and the race goes on
            result = {"failed": str(e).strip().splitlines()[-1][:300], "eval_loss": float("inf"), "steps": 0, "tokens_per_s": 0,
                      "tokens_per_step": 0, "recipe": {"micro_batch": 0, "grad_accum": 0}, "lr": 0, "evals": []}
        out.append({"race": name, "seed": seed, "seconds": seconds, "contestant": kind, **result})
        print(json.dumps(out[-1]), flush=True)
    if not peers_only and len(out) > 2:
        best_peer = min(out[2:], key=lambda r: r["eval_loss"])
        out[0]["best_peer_loss"] = out[1]["best_peer_loss"] = best_peer["eval_loss"]
    return out


def sweep(work: Path, name: str, seconds: float, lr: float, key: str, values: list, seeds: list[int]) -> None:
    """Held-out loss at an equal budget for budgetune with one config key pinned to each value, and
    the defaults (the planner's choice, or the config default) beside them."""
    cfg = task_config(work, name, lr)
    section, field = key.split(".")
    in_process("warm", {"config": {**cfg, "budget": {"time": f"{seconds}s"}, "output": {"dir": str(work / "unused")}}})
    print(f"\n| {key} ({name}, {seconds:.0f} s) | seed | steps | tokens/step | held-out loss |\n|---|---|---|---|---|")
    for seed in seeds:
        for value in values + [None]:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["train"] = {**run_cfg.get("train", {}), "seed": seed}
            if value is not None:
                run_cfg[section] = {**run_cfg.get(section, {}), field: value}
            r = in_process("budgetune", {"config": {**run_cfg, "budget": {"time": f"{seconds}s"},
                                                    "output": {"dir": str(work / "runs" / f"sweep-{key}-{value}-{seed}"), "overwrite": True}}})
            label = f"{value}" if value is not None else "default"
            print(f"| {label} | {seed} | {r['steps']} | {r['tokens_per_step']:,.0f} | {r['eval_loss']:.3f} |", flush=True)


def table(rows: list[dict]) -> str:
    lines = ["| race | seed | contestant | steps | tokens/step | tokens/s | held-out loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['race']} ({r['seconds']:.0f} s) | {r['seed']} | {NAMES[r['contestant']]} | failed: {r['failed']} | | | |")
            continue
        lines.append(f"| {r['race']} ({r['seconds']:.0f} s) | {r['seed']} | {NAMES[r['contestant']]} | {r['steps']} | "
                     f"{r['tokens_per_step']:,.0f} | {r['tokens_per_s'] or 0:,.0f} | {r['eval_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_run":
        spec = json.loads(Path(sys.argv[3]).read_text())
        run = {"budgetune": run_budgetune, "peer": run_peer, "warm": lambda spec: _prepared(spec) and {}}[sys.argv[2]]
        print(json.dumps(run(spec)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--races", default="finetune-full,pretrain,finetune-lora")
    ap.add_argument("--peers", help="comma-separated subset of the peers (default: all for each race; none: budgetune only)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--peers-only", action="store_true", help="run only the peers (to add or repeat one)")
    ap.add_argument("--work", help="work folder (reuses its base model, data and caches)")
    ap.add_argument("--sweep", help="instead of the race: budgetune with one config key pinned to each value, "
                                    "e.g. train.batch_tokens=512,2048,4096 or optim.beta2=0.95,0.999 (values parsed as YAML)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-race-"))
    if args.sweep:
        import yaml

        key, _, values = args.sweep.partition("=")
        sweep(work, args.races.split(",")[0], args.seconds, args.lr, key, [yaml.safe_load(v) for v in values.split(",")],
              [int(s) for s in args.seeds.split(",")])
        return
    rows = []
    for name in args.races.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows += race(work, name, args.seconds, seed, args.lr, ([] if args.peers == "none" else args.peers.split(",")) if args.peers else None, args.peers_only)
    print()
    print(table(rows))
    for r in rows:
        if r["contestant"].startswith("budgetune") and "best_peer_loss" in r:
            share = "0.5× the budget" if r["contestant"] == "budgetune_half" else "the full budget"
            print(f"- {r['race']} seed {r['seed']}, {share}: budgetune chose {r['recipe']['micro_batch']}×{r['recipe']['grad_accum']} "
                  f"rows/step at LR {r['lr']:.3g}: loss {r['eval_loss']:.3f} vs best peer {r['best_peer_loss']:.3f} "
                  f"({'lower' if r['eval_loss'] < r['best_peer_loss'] else 'NOT lower'})")


if __name__ == "__main__":
    main()
