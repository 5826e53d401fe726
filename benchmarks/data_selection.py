"""Data selection at an equal training budget that covers less than one epoch (issue 17).

    python benchmarks/data_selection.py [--share 0.4 | --seconds S] [--base-steps 60] [--preset llama-test] [--seeds 0,1] [--work DIR]
    python benchmarks/data_selection.py --model ~/.cache/budgetune/gguf/SmolLM2-135M-Instruct.Q4_1-*/ --data clean --train 150 --work DIR

The budget is a token budget by default (--share of an epoch of the clean training set):
the same training compute for every run, so the
comparison of rankings does not depend on what else the (shared) machine is doing; what
scoring costs in time is measured separately (step 3) and set against the time `all` took.
`--seconds` gives every run the same time budget instead, scoring paid inside it.

1. A base model: `budgetune train demo` for --base-steps steps with --preset's architecture
   (default llama-test, ~0.3M parameters: small enough for a shared 2-core CPU), pre-trained
   on the standard library's sources, as benchmarks/methods.py does with llama-tiny.
2. Data: the docstring → function chat set (`stdlib_chat`, functions up to 1,200 characters):
   100 clean chats are the held-out set (data.eval), 50 others the RDS target examples, 300
   more the training data. (a) clean: those 300. (b) noisy: the same with 30% of the final
   set noise — 7.5% each of exact duplicates, near duplicates (a reworded request and a
   trailing comment), chats whose answer is swapped with another's, answers cut to 30%.
3. Scoring cost: the first seed's runs score pass by pass into a shared cache (loss, then
   ifd's answer-alone pass, cdas's pooled states, rds's weighted pooling + targets); the sum
   of a method's passes is what it pays out of a time budget on a fresh cache. The second
   seed reuses the scores.
4. Each run fine-tunes the base (full, AdamW, lr 5e-4, seq_len 256, micro-batch 8) for the
   same budget. `all`: no selection (a random order over everything); then each
   data.select method keeping the share of tokens that `all` got through in the budget
   (a perfect ranking puts the whole budget on its best examples). On (b) also `all` +
   data.dedup near. Held-out loss on the clean held-out chats, per seed.

(c) the real model: `--model` names a pretrained folder (SmolLM2-135M-Instruct as `budgetune fetch
smollm2-135m-instruct` caches it) instead of step 1's base; every run is then LoRA r16 (lr 1e-3,
micro-batch 2, as benchmarks/real_models.py; held-out loss on the first 8,192 held-out tokens) and
scores with the real model's losses and states.
On a 2-core CPU a 135M model trains ~200 tokens/s: `--train 150` keeps the runs to minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _runs import train_in_process

METHODS = ["random", "length", "loss", "ifd", "cdas", "rds"]


run = train_in_process  # one budgetune.train in its own process (benchmarks/_runs.py)


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def noisy(records: list[dict], seed: int = 0) -> list[dict]:
    """30% noise: exact and near duplicates added, answers swapped or truncated in place."""
    rng = random.Random(seed)
    n = len(records)
    k = round(0.15 * n / 0.85 / 2)  # each of the four kinds: 7.5% of the final set
    out = [json.loads(json.dumps(r)) for r in records]
    victims = rng.sample(range(n), 3 * k)
    swapped, truncated = victims[: 2 * k : 2], victims[2 * k :]
    for a in swapped:  # swap with a random other chat
        b = rng.randrange(n)
        out[a]["messages"][2]["content"], out[b]["messages"][2]["content"] = (out[b]["messages"][2]["content"],
                                                                              out[a]["messages"][2]["content"])
    for a in truncated:
        answer = out[a]["messages"][2]["content"]
        out[a]["messages"][2]["content"] = answer[: max(1, int(0.3 * len(answer)))]
    extra = [json.loads(json.dumps(records[i])) for i in rng.sample(range(n), k)]
    for i in rng.sample(range(n), k):
        near = json.loads(json.dumps(records[i]))
        near["messages"][1]["content"] = near["messages"][1]["content"].replace("Write", "Please write", 1)
        near["messages"][2]["content"] += "\n# end"
        extra.append(near)
    out += extra
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", type=float, default=0.4, help="token budget: this share of an epoch of (a)")
    ap.add_argument("--seconds", type=float, default=None, help="a time budget per run instead of --tokens")
    ap.add_argument("--base-steps", type=int, default=60)
    ap.add_argument("--preset", default="llama-test", help="architecture of the base (demo uses llama-tiny)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--data", default="clean,noisy", help="which sets: clean (a), noisy (b); separate processes can share --work")
    ap.add_argument("--work", help="work folder (reuses its base model if present)")
    ap.add_argument("--model", help="a pretrained model folder to fine-tune with LoRA r16 instead of the demo-trained base (c)")
    ap.add_argument("--train", type=int, default=300, help="training chats in (a); (b) adds its noise to them")
    args = ap.parse_args()
    from budgetune.data.corpora import stdlib_chat

    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-selection-"))
    base_model = args.model or str(tmp / "base" / "model")
    if not args.model and not (tmp / "base" / "model").exists():
        subprocess.run([sys.executable, "-m", "budgetune", "train", "demo", "--budget.time", "1h", "--budget.steps", str(args.base_steps), "--model.preset", args.preset,
                        "--output.dir", str(tmp / "base"), "--quiet", "--overwrite"], check=True)
    chats = [json.loads(line) for line in stdlib_chat(tmp / "chat.jsonl", limit=3000, max_chars=1200).read_text().splitlines()]
    random.Random(0).shuffle(chats)
    heldout, target, train = chats[:100], chats[100:150], chats[150:150 + args.train]
    files = {"eval": write(tmp / "heldout.jsonl", heldout), "target": write(tmp / "target.jsonl", target),
             "clean": write(tmp / "clean.jsonl", train), "noisy": write(tmp / "noisy.jsonl", noisy(train))}

    # the demo-trained base: full fine-tuning; a real model (c): LoRA r16 at real_models.py's settings
    recipe = ({"method": {"name": "lora", "r": 16}, "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}, "micro_batch": 2, "eval_tokens": 8192}
              if args.model else {"method": "full", "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.0}, "micro_batch": 8, "eval_tokens": 16384})

    def config(data: str, label: str, seed: int, select=None, dedup="off", budget=None) -> dict:
        out = tmp / "runs" / data / f"{label}-s{seed}"
        return {
            "model": {"name": base_model},
            "data": {"train": [files[data]], "eval": [files["eval"]], "seq_len": 256, "cache_dir": str(tmp / "cache"),
                     "dedup": dedup, "select": select or {"method": "off"}},
            "method": recipe["method"], "optim": recipe["optim"],
            "schedule": {"name": "cosine", "warmup": 0.05}, "budget": budget or ({"time": f"{args.seconds}s"} if args.seconds else {"tokens": int(args.tokens)}),
            "train": {"micro_batch": recipe["micro_batch"], "seed": seed},
            "eval": {"every": None, "max_tokens": recipe["eval_tokens"]},
            "checkpoint": {"every": None}, "output": {"dir": str(out), "overwrite": True},
        }

    results: dict = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    cost: dict = {}
    if not args.seconds:  # the token budget: a share of an epoch of (a), counted by a one-step run
        label = f"count-{args.data}-{args.seeds}".replace(",", "+")  # one per process sharing --work
        probe = run(config("clean", label, 0, budget={"steps": 1}), tmp / "runs" / "clean" / f"{label}-s0")
        args.tokens = round(args.share * probe["data"]["train_tokens"])
    for data in args.data.split(","):
        for seed in seeds:
            base = run(config(data, "all", seed), Path(config(data, "all", seed)["output"]["dir"]))
            fraction = round(min(1.0, max(0.02, base["tokens"] / base["data"]["train_tokens"])), 3)
            rows = {"all": base}
            for method in args.methods.split(","):
                select = {"method": method, "fraction": fraction}
                if method == "rds":
                    select["target"] = [files["target"]]
                cfg = config(data, method, seed, select)
                rows[method] = run(cfg, Path(cfg["output"]["dir"]))
                if seed == seeds[0] and method in ("loss", "ifd", "cdas", "rds"):
                    # the first seed's runs score pass by pass into the shared cache (loss: answer loss; ifd: + the
                    # answer alone; cdas: + mean-pooled states; rds: weighted pooling + targets, nothing shared):
                    # what each method pays on a fresh cache is the sum of its passes
                    paid = rows[method]["data"]["selection"]["scoring_s"]
                    cost[(data, method)] = paid + (0.0 if method in ("loss", "rds") else cost[(data, {"ifd": "loss", "cdas": "ifd"}[method])])
            if data == "noisy":
                cfg = config(data, "all+dedup", seed, dedup="near")
                rows["all + dedup near"] = run(cfg, Path(cfg["output"]["dir"]))
            for label, s in rows.items():
                sel = s["data"].get("selection") or {}
                entry = {"data": data, "seed": seed, "run": label, "fraction": fraction, "eval_loss": s["eval_loss_after"],
                         "loss_before": s["eval_loss_before"], "tokens": s["tokens"], "steps": s["steps"],
                         "train_s": s["elapsed_s"], "epoch_tokens": base["data"]["train_tokens"],
                         "scoring_s": cost.get((data, label), 0.0), "examples": s["data"]["train_examples"],
                         "dedup": s["data"].get("dedup")}
                results.setdefault((data, label), []).append(entry)
                print(json.dumps(entry), flush=True)

    budget = f"{args.seconds:.0f} s" if args.seconds else f"{args.tokens:,.0f} training tokens"
    described = f"{args.model} (LoRA r16)" if args.model else f"{args.preset}, {args.base_steps} steps of demo pre-training"
    print(f"\nequal budget per run: {budget}; base: {described}; {args.train} training chats; seeds {seeds}; "
          f"held-out: 100 clean chats\n")
    print("| data | run | kept share of tokens | held-out loss per seed | mean | Δ vs all | scoring cost s | run time s | tokens trained |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data in args.data.split(","):
        ref = statistics.mean(e["eval_loss"] for e in results[(data, "all")])
        for (d, label), entries in results.items():
            if d != data:
                continue
            mean = statistics.mean(e["eval_loss"] for e in entries)
            share = "1.0" if label.startswith("all") else "/".join(f"{e['fraction']:.2f}" for e in entries)
            losses = " / ".join(f"{e['eval_loss']:.3f}" for e in entries)
            print(f"| {data} | {label} | {share} | {losses} | {mean:.3f} | "
                  f"{mean - ref:+.3f} | {statistics.mean(e['scoring_s'] for e in entries):.1f} | "
                  f"{statistics.mean(e['train_s'] for e in entries):.0f} | "
                  f"{statistics.mean(e['tokens'] for e in entries):,.0f} |")
    dd = results.get(("noisy", "all + dedup near"))
    if dd:
        print(f"\ndedup near on (b): dropped {dd[0]['dedup']['dropped_exact']} exact and {dd[0]['dedup']['dropped_near']} near "
              f"duplicates of {dd[0]['examples'] + dd[0]['dedup']['dropped_exact'] + dd[0]['dedup']['dropped_near']} chats")
    first = results[(args.data.split(",")[0], "all")][0]
    print(f"loss of the base on the held-out chats before training: {first['loss_before']:.3f}; "
          f"one epoch of {args.data.split(',')[0]} is {first['epoch_tokens']:,} tokens")


if __name__ == "__main__":
    main()
