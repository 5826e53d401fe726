"""Re-warming an extended run: a finished run (or a raced trial) continued onto a larger token budget.

    python benchmarks/rewarm.py --run RUN_DIR --tokens 1.5M [--work DIR]

Three arms, each to the same total of --tokens, same data order and held-out rows:
- jump:   `--resume --extend` with schedule.warmup 0 on the extension: the LR goes from where the run stopped (~0 after
          its annealing) straight to the schedule's, as every extension did before schedules.rewarmed;
- rewarm: `--resume --extend` as it runs now: the LR ramps from where it stopped over schedule.warmup;
- fresh:  the same recipe trained from its start on the whole budget (its own warmup).

RUN_DIR is any run folder with a checkpoint, e.g. a trial of `budgetune tune` (RUN/trials/NN-label: the race's
winner continues one exactly like this). Each arm trains a copy; RUN_DIR is not changed. A checkpoint written before
the last LR was saved in it gets that LR from the run's metrics.jsonl, as the current version would have saved it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml


def arm(kind: str, source: Path, tokens: int, out: Path) -> dict:
    from budgetune.checkpoint import list_checkpoints
    from budgetune.metrics import read_metrics
    from budgetune.train import train

    cfg = yaml.safe_load((source / "config.yaml").read_text())
    cfg["budget"] = {"tokens": tokens}
    cfg["eval"].update({"every": 0.1, "max_tokens": 32768, "prompts": []})
    cfg["checkpoint"].update({"every": None})
    cfg["output"] = {"dir": str(out), "overwrite": True, "report": False}
    if kind == "fresh":
        summary = train(cfg, quiet=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source, out, ignore=shutil.ignore_patterns("model", "trials", "report.html", ".budgetune-lock"))
        for stale in ("summary.json", "tune.json"):
            (out / stale).unlink(missing_ok=True)
        state_path = list_checkpoints(out / "checkpoints")[-1] / "state.json"
        state = json.loads(state_path.read_text())
        if "lr" not in state:  # saved before the LR was: the LR of its last step, from the metrics
            state["lr"] = [e for e in read_metrics(out / "metrics.jsonl") if "event" not in e][state["clock"]["steps"] - 1]["lr"]
            state_path.write_text(json.dumps(state))
        if kind == "jump":
            cfg["schedule"]["warmup"] = 0.0  # no ramp (the extension is past the run's own warmup either way)
        cfg["output"]["overwrite"] = False
        summary = train(cfg, resume=True, extend=True, quiet=True)
    evals = [(e["tokens"], round(e["eval_loss"], 4)) for e in read_metrics(out / "metrics.jsonl") if e.get("event") == "eval"]
    return {"arm": kind, "tokens": summary["tokens"], "steps": summary["steps"], "eval_loss": summary["eval_loss_after"], "evals": evals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with a checkpoint (e.g. RUN/trials/02-full-lr0.0015 of a tune)")
    ap.add_argument("--tokens", required=True, help="total token budget of every arm (e.g. 1.5M)")
    ap.add_argument("--arms", default="jump,rewarm,fresh")
    ap.add_argument("--work", help="where the arms train (default: a temporary folder)")
    args = ap.parse_args()
    from budgetune.units import parse_count

    source = Path(args.run)
    if not (source / "config.yaml").exists() or not (source / "checkpoints").is_dir():
        sys.exit(f"{source}: not a run folder with checkpoints (config.yaml and checkpoints/)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-rewarm-"))
    rows = []
    for kind in args.arms.split(","):
        rows.append(arm(kind, source, int(parse_count(args.tokens)), work / kind))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| arm | steps | tokens | held-out loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['steps']} | {r['tokens']:,.0f} | {r['eval_loss']:.3f} |")


if __name__ == "__main__":
    main()
