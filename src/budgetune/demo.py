"""`budgetune demo`: the whole path on a tiny Llama and the Python standard library, offline."""

from __future__ import annotations

from .config import builtin_config, load_config
from .console import console, say


def demo(overrides=None, overwrite: bool = True, quiet: bool = False) -> dict:
    """Train the demo within its budget (default 3 minutes), then show what it bought."""
    from .evaluate import generate_samples, load_trained
    from .train import train

    cfg = load_config(builtin_config("demo"), overrides)
    say("[bold]budgetune demo[/]: a tiny Llama learns Python from the standard library's sources, "
        f"within a {cfg.budget.time or cfg.budget.describe()} budget. No downloads.", not quiet)
    summary = train(cfg, overwrite=overwrite, quiet=quiet)
    model, tokenizer, _ = load_trained(summary["run_dir"])
    samples = generate_samples(model, tokenizer, cfg.eval.prompts, cfg.eval.sample_tokens, "cpu", cfg.eval.temperature,
                               cfg.eval.repetition_penalty, cfg.train.seed)
    if not quiet:
        uniform = summary["uniform_loss"]
        console.rule("what the budget bought")
        say(f"held-out loss: {summary['eval_loss_before']:.3f} before → [bold]{summary['eval_loss_after']:.3f}[/] after "
            f"(uniform guess over {len(tokenizer)} tokens: ln(V) = {uniform:.3f})")
        say(f"trained {summary['steps']} steps, {summary['tokens']:.0f} tokens at {summary['tokens_per_s']:.0f} tokens/s; "
            f"padding saved by packing: {100 * (1 - summary['data']['padding_fraction']):.1f}% of row tokens are real")
        for prompt, text in zip(cfg.eval.prompts, samples):
            console.rule(f"sample: {prompt!r}", style="dim")
            console.print(prompt + text, markup=False, highlight=False)
        console.rule()
        say(f"run folder: {summary['run_dir']} (report.html, metrics.jsonl, summary.json, model/, checkpoints/)")
    summary["samples"] = [{"prompt": p, "completion": s} for p, s in zip(cfg.eval.prompts, samples)]
    return summary
