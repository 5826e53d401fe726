"""What the user sees while training: a rich progress bar and short status lines."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from .units import format_count, format_duration

__all__ = ["console", "TrainProgress", "say", "quiet_libraries", "print_plan"]

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

    def update(self, p: float, step: int, loss: float, lr: float, tokens_per_s: float, time_left: float | None, governing: str,
               extra: str = ""):
        left = f" {format_duration(time_left)} left" if time_left is not None else ""
        status = f"step {step} loss {loss:.3f}{extra} lr {lr:.1e} {format_count(tokens_per_s)} tok/s{left}"
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


def _short_bytes(n: float) -> str:
    """Three significant digits: '816 MiB', '1.23 GiB' (the plan table must fit 80 columns)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def _short_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 1000 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def print_plan(plan, limit: int = 12, out: Console | None = None) -> None:
    """The ranked recipes as a table, then what does not fit and why.

    Fits 80 columns — a terminal's default, and what rich assumes when the output is piped
    into a log — with nothing cut: compact numbers, no box lines, prose printed unwrapped
    (soft_wrap) so that a log keeps each note on one line."""
    from rich import box
    from rich.table import Table

    from .units import describe_bytes, format_bytes

    out = out or console
    say = lambda text: out.print(text, soft_wrap=True)  # noqa: E731
    say(f"[bold]plan for {plan.device}[/] — memory budget {describe_bytes(plan.memory_budget)}")
    if plan.candidates:  # the same for every candidate: chosen by the device (attention.py, fastpath.py)
        r = plan.candidates[0].recipe
        say(f"fast path: attention {r.attention}, precision {r.precision}, "
            f"{'Liger fused linear + cross-entropy' if r.fused_loss else 'chunked loss'}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    for col in ("#", "method", "batch", "ckpt", "memory", "tok/s", "in budget", "epochs", "trainable"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True, overflow="fold")
    for i, c in enumerate(plan.fitting[:limit], 1):
        r = c.recipe
        table.add_row(
            str(i), r.method + (f" + {r.quantize}" if r.quantize else ""), f"{r.micro_batch}×{r.grad_accum}",
            "on" if r.gradient_checkpointing else "off",
            _short_bytes(c.memory.total), f"{c.tokens_per_s:,.0f}{'' if c.probed else ' ≈'}",
            _short_count(c.tokens_in_budget) if c.tokens_in_budget else "-", f"{c.epochs:.2f}" if c.epochs else "-",
            _short_count(c.trainable),
        )
    out.print(table)
    say("[dim]batch = micro-batch × accumulation; tok/s ≈ predicted from a device guess, without ≈ measured by the probe; "
        "in budget = tokens the time budget trains[/]")
    rejected = [c for c in plan.candidates if not c.fits]
    if not plan.fitting:
        say("[bold red]nothing fits[/] — lower data.seq_len, allow LoRA (unset method.name), or raise budget.memory")
    if rejected:
        say("[bold]does not fit[/] (the smallest variant of each, and where its memory goes):")
        smallest: dict = {}
        for c in rejected:
            key = (c.recipe.method + (f" + {c.recipe.quantize} base" if c.recipe.quantize else ""), c.recipe.gradient_checkpointing)
            if key not in smallest or c.memory.total < smallest[key].memory.total:
                smallest[key] = c
        for (method, ckpt), c in sorted(smallest.items()):
            top = sorted(c.memory.terms.items(), key=lambda kv: -kv[1])[:3]
            say(f"  {method}, micro-batch {c.recipe.micro_batch}, checkpointing {'on' if ckpt else 'off'}: {c.why_not.split(' (')[0]}"
                f" — {', '.join(f'{k} {format_bytes(v)}' for k, v in top)}")
    if plan.best is not None:
        say("[bold]memory of the top recipe:[/]")
        for name, value in sorted(plan.best.memory.terms.items(), key=lambda kv: -kv[1]):
            if value:
                say(f"  {name:<18} {format_bytes(value)}")
        if plan.device == "cpu":
            from .plan.memory import allocator_basis

            say(f"  [dim]= {allocator_basis(plan.best.memory)}[/]")
    if plan.scratch is not None:
        s = plan.scratch
        say(f"[bold]training from scratch:[/] about {format_count(s.params)} non-embedding parameters on "
            f"{format_count(s.tokens)} tokens, peak LR {s.lr:.2e}, batch {format_count(s.batch_tokens)} tokens")
        for line in s.reasoning:
            say(f"  - {line}")
    for note in plan.notes:
        say(f"[dim]{note}[/]")
