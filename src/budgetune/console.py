"""What the user sees while training: a rich progress bar and short status lines."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .units import format_count, format_duration

console = Console(stderr=False, highlight=False)


class TrainProgress:
    """Progress over the governing budget, with tokens/s, loss, LR and budget time left."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not enabled,
            refresh_per_second=4,
        )
        self._task = None

    def __enter__(self):
        self._progress.__enter__()
        self._task = self._progress.add_task("train", total=1.0, status="")
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def update(self, p: float, step: int, loss: float, lr: float, tokens_per_s: float, time_left: float | None, governing: str):
        left = f" | {format_duration(time_left)} left" if time_left is not None else ""
        status = f"step {step} | loss {loss:.3f} | lr {lr:.2e} | {format_count(tokens_per_s)} tok/s{left} [{governing}]"
        self._progress.update(self._task, completed=p, status=status)

    def log(self, message: str):
        if self.enabled:
            self._progress.console.print(message)


def say(message: str, enabled: bool = True) -> None:
    if enabled:
        console.print(message)
        sys.stdout.flush()


def quiet_libraries() -> None:
    """Our progress bar is the one the user reads: silence the libraries' own tqdm bars."""
    import os

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
