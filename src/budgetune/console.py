"""What the user sees while training: a rich progress bar and short status lines."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from .units import format_count, format_duration

console = Console(stderr=False, highlight=False)


class TrainProgress:
    """Progress over the governing budget, with tokens/s, loss, LR and budget time left."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>5.1f}% of {task.fields[governing]}"),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
            disable=not enabled,
            refresh_per_second=4,
        )
        self._task = None

    def __enter__(self):
        self._progress.__enter__()
        self._task = self._progress.add_task("train", total=1.0, status="", governing="budget")
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def update(self, p: float, step: int, loss: float, lr: float, tokens_per_s: float, time_left: float | None, governing: str):
        left = f" {format_duration(time_left)} left" if time_left is not None else ""
        status = f"step {step} loss {loss:.3f} lr {lr:.1e} {format_count(tokens_per_s)} tok/s{left}"
        self._progress.update(self._task, completed=p, status=status, governing=governing)

    def log(self, message: str):
        if self.enabled:
            self._progress.console.print(message)


def say(message: str, enabled: bool = True) -> None:
    if enabled:
        console.print(message)
        sys.stdout.flush()


def quiet_libraries() -> None:
    """Our progress bar is the one the user reads: silence the libraries' own tqdm bars."""
    import logging
    import os
    import warnings

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # peft still calls transformers' pre-5.0 checkpointing names; the warning is not the user's concern
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.modeling_utils")
    # bitsandbytes (imported by peft when installed) warns on the CPU about a 4-bit kernel we never use
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def print_plan(plan, limit: int = 12) -> None:
    """The ranked recipes as a table, then what does not fit and why."""
    from rich.table import Table

    from .units import describe_bytes, format_bytes

    table = Table(title=f"plan for {plan.device} — memory budget {describe_bytes(plan.memory_budget)}", show_lines=False)
    for col in ("#", "method", "batch", "ckpt", "memory", "tok/s", "in budget", "epochs", "trainable"):
        table.add_column(col, justify="right" if col not in ("method",) else "left", no_wrap=True)
    for i, c in enumerate(plan.fitting[:limit], 1):
        r = c.recipe
        table.add_row(
            str(i), r.method, f"{r.micro_batch}×{r.grad_accum}", "on" if r.gradient_checkpointing else "off",
            format_bytes(c.memory.total), f"{c.tokens_per_s:,.0f}{'' if c.probed else ' ≈'}",
            format_count(c.tokens_in_budget) if c.tokens_in_budget else "-", f"{c.epochs:.2f}" if c.epochs else "-",
            format_count(c.trainable),
        )
    console.print(table)
    console.print("[dim]batch = micro-batch × accumulation; tok/s ≈ predicted from a device guess, without ≈ measured by the probe[/]")
    rejected = [c for c in plan.candidates if not c.fits]
    if not plan.fitting:
        console.print("[bold red]nothing fits[/] — lower data.seq_len, allow LoRA (unset method.name), or raise budget.memory")
    if rejected:
        console.print("[bold]does not fit[/] (the smallest variant of each, and where its memory goes):")
        smallest: dict = {}
        for c in rejected:
            key = (c.recipe.method, c.recipe.gradient_checkpointing)
            if key not in smallest or c.memory.total < smallest[key].memory.total:
                smallest[key] = c
        for (method, ckpt), c in sorted(smallest.items()):
            top = sorted(c.memory.terms.items(), key=lambda kv: -kv[1])[:3]
            console.print(f"  {method}, micro-batch {c.recipe.micro_batch}, checkpointing {'on' if ckpt else 'off'}: {c.why_not.split(' (')[0]}"
                          f" — {', '.join(f'{k} {format_bytes(v)}' for k, v in top)}")
    if plan.best is not None:
        console.print("[bold]memory of the top recipe:[/]")
        for name, value in sorted(plan.best.memory.terms.items(), key=lambda kv: -kv[1]):
            if value:
                console.print(f"  {name:<18} {format_bytes(value)}")
    if plan.scratch is not None:
        s = plan.scratch
        console.print(f"[bold]training from scratch:[/] about {format_count(s.params)} non-embedding parameters on "
                      f"{format_count(s.tokens)} tokens, peak LR {s.lr:.2e}, batch {format_count(s.batch_tokens)} tokens")
        for line in s.reasoning:
            console.print(f"  - {line}")
    for note in plan.notes:
        console.print(f"[dim]{note}[/]")
