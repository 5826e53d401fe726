"""The budget race at equal wall-clock: `budgetune tune` (race + winner) against budgetune's defaults and the peers.

    python benchmarks/tune.py [--tasks chat,pretrain,smollm2] [--seconds 300,600] [--seeds 0,1]
                              [--contestants defaults,tune,trl_padding_free,...] [--work DIR]
    python benchmarks/tune.py --modes --tasks chat --tokens 400k --seeds 0     # tune.mode: cooldown vs branch, equal tokens
    python benchmarks/tune.py --table LOG [LOG ...]   # one table, with reach times, from earlier runs' stdout (oldest first)
    python benchmarks/tune.py --tasks pretrain --seconds 300 --seeds 0 --contestants defaults --set schedule.warmup=0.001
                                                      # budgetune's contestants with a config key pinned (peers unchanged)

Tasks (every contestant gets the same model, seeded initial weights, tokenizer, tokenised data, held-out rows and
wall-clock; held-out loss is `budgetune.evaluate.heldout_loss` on the same packed rows for everyone):
- pretrain: the demo corpus (the standard library's sources) from scratch, `llama-tiny`, 2,048-token BPE, seq_len 512;
- chat: the standard library's docstring → function chats (`stdlib_chat`, 1,000 chats), full fine-tuning of the demo
  base (`budgetune train demo` for 90 s, as benchmarks/race.py builds it), seq_len 512;
- smollm2: SmolLM2-135M-Instruct (`budgetune fetch smollm2-135m-instruct` first) on the same chats, LoRA, seq_len 512.

Contestants: `defaults` = `budgetune.train` with the task config and nothing else; `tune` = `budgetune.tune` with the
same config (tune.fraction 0.15); the peers of benchmarks/race.py (TRL `SFTTrainer` padding-free / packing, the
transformers `Trainer`), run by race.py's own code at the same peak LR (3e-4, as in issue 12). For `tune` the script
also reports when (command seconds) the winner's held-out loss first reached each peer's final loss, from the
winner's periodic evals (the race's seconds included), and the same for the defaults; `--table` does this across
invocations, so contestants of one task may run at different times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from budgetune.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import train_in_process  # noqa: E402
from race import EVAL_TOKENS, NAMES, PEERS, demo_base, in_process  # noqa: E402

HERE = Path(__file__).resolve()
NAMES = {**NAMES, "defaults": "budgetune defaults", "tune": "budgetune tune (race + winner)"}


def task_config(work: Path, task: str, lr: float) -> dict:
    """What a user would write for the task: model, data, seq_len; no budget-dependent keys."""
    from budgetune.data.corpora import stdlib_chat

    common = {"data": {"seq_len": 512, "eval_fraction": 0.05, "cache_dir": str(work / "cache")}, "eval": {"max_tokens": EVAL_TOKENS}}
    if task == "pretrain":
        return {**common, "model": {"init": "scratch", "preset": "llama-tiny"}, "tokenizer": {"train_vocab_size": 2048},
                "data": {**common["data"], "train": ["{stdlib}/**/*.py"], "max_files": 400}}
    chats = str(stdlib_chat(work / "chat.jsonl", limit=1000))
    if task == "chat":
        return {**common, "model": {"name": str(demo_base(work))}, "data": {**common["data"], "train": [chats]}}
    if task == "smollm2":
        return {**common, "model": {"name": "smollm2-135m-instruct"}, "method": {"name": "lora"},
                "data": {**common["data"], "train": [chats], "eval_fraction": 0.2}}
    raise SystemExit(f"unknown task {task!r}")


def run_tune(spec: dict) -> dict:
    """budgetune.tune in this process, reported by `tune_result`."""
    import budgetune

    return tune_result(budgetune.tune(spec["config"], quiet=True))


def tune_result(summary: dict) -> dict:
    """The row for a finished tune: its summary, and the final run's eval curve on the command's clock."""
    run, t = Path(summary["run_dir"]), summary["tune"]
    state = json.loads((run / "tune.json").read_text())
    evals = [e for e in read_metrics(run / "metrics.jsonl") if e.get("event") == "eval"]
    if t["winner"] is None:  # nothing raced (the budget affords fewer than two candidates): one plain run, planned first
        curve = [(state["elapsed_s"] - summary["elapsed_s"] + e["seconds"], e["eval_loss"]) for e in evals]
        tokens, trials = summary["tokens"], []
    else:  # the winner's evals after the race: race seconds + the winner's own seconds since it continued
        start = state["lineage_elapsed_s"]
        curve = [(state["race_s"] + e["seconds"] - start, e["eval_loss"]) for e in evals if e["seconds"] > start]
        curve.append((t["command_elapsed_s"], summary["eval_loss_after"]))
        tokens = t["tokens_including_race"]
        trials = [(trial["label"], [round(r["loss"], 4) for r in trial["rungs"]]) for trial in t["trials"]]
    return {"eval_loss": summary["eval_loss_after"], "steps": summary["steps"], "elapsed_s": t["command_elapsed_s"],
            "tokens": tokens, "tokens_per_s": summary["train_tokens_per_s_median"],
            "tokens_per_step": summary["recipe"]["batch_tokens"], "winner": t["winner"], "why": t["why"],
            "race_share": t["race_share"], "candidates": t["candidates"], "space": t["space_size"], "mode": t["mode"],
            "curve": curve, "trials": trials}


def _own_process(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    done = subprocess.run([sys.executable, str(HERE), "_run", f.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tune failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def contest(work: Path, task: str, seconds: float, seed: int, kind: str, lr: float, extra: dict | None = None,
            tokens: str | None = None, pins: list[str] = ()) -> dict:
    cfg = task_config(work, task, lr)
    cfg["train"] = {"seed": seed}
    out = work / "runs" / (f"{task}-{tokens or int(seconds)}-{seed}-{kind}" + ("-" + "-".join(map(str, extra.values())) if extra else "")
                           + "".join(f"-{pin}" for pin in pins))
    if kind in ("defaults", "tune"):
        for pin in pins:
            pin_key(cfg, pin)
    budget = {"tokens": tokens} if tokens else {"time": f"{seconds}s"}
    if kind == "defaults":
        s = train_in_process({**cfg, "budget": budget, "output": {"dir": str(out), "overwrite": True}}, out)
        curve = [(e["seconds"], e["eval_loss"]) for e in read_metrics(out / "metrics.jsonl") if e.get("event") == "eval"]
        return {"eval_loss": s["eval_loss_after"], "steps": s["steps"], "elapsed_s": s["elapsed_s"], "tokens": s["tokens"],
                "tokens_per_s": s["train_tokens_per_s_median"], "tokens_per_step": s["recipe"]["batch_tokens"],
                "lr": s["recipe"]["lr"], "curve": [*curve, (s["elapsed_s"], s["eval_loss_after"])]}
    if kind == "tune":
        return _own_process({"config": {**cfg, "budget": budget, "tune": extra or {}, "output": {"dir": str(out), "overwrite": True}}})
    # a peer: race.py's code; it reads the LR from optim.lr
    return in_process("peer", {"config": {**cfg, "optim": {"lr": lr}, "budget": budget, "output": {"dir": str(work / "unused")}},
                               "kind": kind, "seconds": seconds, "seed": seed})


def pin_key(cfg: dict, pin: str) -> None:
    """`section.key=value` (the value parsed as YAML) set in the config dict."""
    import yaml

    key, _, value = pin.partition("=")
    *path, last = key.split(".")
    for part in path:
        cfg = cfg.setdefault(part, {})
    cfg[last] = yaml.safe_load(value)


def first_reach(curve: list, target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_run":
        print(json.dumps(run_tune(json.loads(Path(sys.argv[2]).read_text()))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="chat,pretrain,smollm2")
    ap.add_argument("--seconds", default="300,600")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--contestants", help="default: defaults, tune and every peer race.py has for the task")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak LR of the peers; budgetune's defaults leave optim.lr open (3e-4, an adapter "
                                                          "method's ×ADAPTER_LR_SCALE, Step Law's from scratch); tune races its own")
    ap.add_argument("--modes", action="store_true", help="instead: tune with tune.mode cooldown against branch")
    ap.add_argument("--tokens", help="a token budget instead of --seconds (results independent of the machine's load)")
    ap.add_argument("--work", help="work folder (reuses its base model, data and caches)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="pin a config key for budgetune's contestants (defaults, tune); repeatable")
    ap.add_argument("--table", nargs="+", metavar="LOG", help="instead: the table (with reach times) of earlier runs' stdout logs, oldest first")
    args = ap.parse_args()
    if args.table:
        print_table(read_rows(args.table), args.tokens)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-tune-"))
    rows = []
    for task in args.tasks.split(","):
        peers = PEERS["pretrain" if task == "pretrain" else "finetune-full"]
        kinds = args.contestants.split(",") if args.contestants else ["defaults", "tune", *peers]
        for seconds in ([0.0] if args.tokens else [float(s) for s in args.seconds.split(",")]):
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = task_config(work, task, args.lr)
                cfg["train"] = {"seed": seed}
                # tokenise (and train the tokenizer) before anyone's clock starts: every contestant reads the cache
                budget = {"tokens": args.tokens} if args.tokens else {"time": f"{seconds}s"}
                in_process("warm", {"config": {**cfg, "budget": budget, "output": {"dir": str(work / "unused")}}})
                variants = [("tune", {"mode": m}) for m in ("cooldown", "branch")] if args.modes else [(k, None) for k in kinds]
                for kind, extra in variants:
                    try:
                        result = contest(work, task, seconds, seed, kind, args.lr, extra, args.tokens, args.set)
                    except RuntimeError as e:
                        result = {"failed": str(e).strip().splitlines()[-1][:300], "eval_loss": float("inf")}
                    pinned = {"set": ",".join(args.set)} if args.set and kind in ("defaults", "tune") else {}
                    rows.append({"task": task, "seconds": seconds, "seed": seed, "contestant": kind, **(extra or {}), **pinned, **result})
                    print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows, args.tokens)


def read_rows(logs: list[str]) -> list[dict]:
    """The rows earlier invocations printed (their stdout, one JSON object a line); a later row of the same
    task, budget, seed and contestant replaces an earlier one, so list the logs oldest first."""
    rows: dict[tuple, dict] = {}
    for log in logs:
        for line in Path(log).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["task"], r["seconds"], r["seed"], r["contestant"], r.get("mode"), r.get("set"))] = r
    return list(rows.values())


def peers_of(rows: list[dict], task: str, seconds: float, seed: int) -> list[dict]:
    """The peers' finished rows of one task, budget and seed."""
    return [p for p in rows if (p["task"], p["seconds"], p["seed"]) == (task, seconds, seed)
            and p["contestant"] not in ("tune", "defaults") and "failed" not in p]


def print_table(rows: list[dict], tokens: str | None = None) -> None:
    """The results as a markdown table; for `tune` and the defaults, when (seconds on the command's clock) their
    periodic evals first reached each peer's final loss of the same task, budget and seed."""
    print("| task | T | seed | contestant | steps | tokens | tokens/s | held-out loss | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["task"], r["seconds"], r["seed"])):
        name = NAMES.get(r["contestant"], r["contestant"]) + (f", {r['mode']}" if "mode" in r else "") + (f", {r['set']}" if "set" in r else "")
        if "failed" in r:
            print(f"| {r['task']} | {r['seconds']:.0f} s | {r['seed']} | {name} | failed: {r['failed']} | | | | |")
            continue
        notes = []
        if r["contestant"] == "tune":
            notes.append(f"winner {r['winner']} of {r['candidates']} (space {r['space']}); race {100 * r['race_share']:.0f}% of T"
                         if r["winner"] else f"{r['why']} (space {r['space']})")
        if "curve" in r:  # rows of the defaults from before they carried their curve have none
            peers = peers_of(rows, r["task"], r["seconds"], r["seed"])
            reach = [f"{NAMES[p['contestant']]} {p['eval_loss']:.3f} at "
                     + (f"{t:.0f} s ({t / r['seconds']:.2f}×)" if (t := first_reach(r["curve"], p["eval_loss"])) is not None else "never")
                     for p in peers if r["seconds"]]
            notes += ["reaches " + "; ".join(reach)] if reach else []
        budget = tokens + " tokens" if tokens else f"{r['seconds']:.0f} s"
        print(f"| {r['task']} | {budget} | {r['seed']} | {name} | {r['steps']} | {r['tokens']:,.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['eval_loss']:.3f} | {'; '.join(notes)} |")
    if not tokens:
        print_half_budget(rows)


def print_half_budget(rows: list[dict]) -> None:
    """budgetune's contestants run with half the budget against the best peer run with the whole, same task and
    seed. Budget-progress schedules anneal when their budget ends, so a run's own evals at T/2 understate what a
    T/2 budget buys (and with a slow model there may be none: periodic evals cost at most 2% of the budget);
    a run on budget T/2 that ends at or below the peer's loss at T is what "reaches it in 0.5 T" means for a user."""
    lines = []
    for r in rows:
        if r["contestant"] not in ("tune", "defaults") or "set" in r or "failed" in r or not r["seconds"]:
            continue
        if peers := peers_of(rows, r["task"], 2 * r["seconds"], r["seed"]):
            best = min(peers, key=lambda p: p["eval_loss"])
            name = NAMES[r["contestant"]] + (f", {r['mode']}" if r.get("mode", "cooldown") != "cooldown" else "")
            lines.append(f"| {r['task']} | {r['seed']} | {name} | {r['eval_loss']:.3f} | "
                         f"{NAMES[best['contestant']]} | {best['eval_loss']:.3f} | {best['eval_loss'] - r['eval_loss']:+.3f} |")
    if lines:
        print()
        print("| task | seed | budgetune at T/2 | held-out loss | best peer at T | held-out loss | T/2 run below it by |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
