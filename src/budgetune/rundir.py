"""The run folder: where a run's config, metrics, checkpoints and outputs live."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import BudgetuneError

# Written into every run folder budgetune creates: --overwrite deletes only folders that have
# it (or, from before the marker, both config.yaml and metrics.jsonl), so a config naming
# some other folder as output.dir can never get it deleted.
MARKER = ".budgetune-run"
LOCK = ".budgetune-lock"  # held (flock) by the process writing the run; the kernel drops it when that process dies


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model(self) -> Path:
        """The trained result in Hugging Face format: a full model or a peft adapter, with tokenizer."""
        return self.path / "model"

    @property
    def base(self) -> Path:
        """For adapters over a model trained from scratch: the (random-init) base they adapt."""
        return self.path / "base"

    def exists(self) -> bool:
        return self.config.exists()

    def is_run(self) -> bool:
        """A folder budgetune made for a run (and so may delete on --overwrite)."""
        return (self.path / MARKER).exists() or (self.config.exists() and self.metrics.exists())

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, before any work, a folder that cannot take this run (never overwrite silently)."""
        if resume:
            if not self.exists():
                raise BudgetuneError(f"--resume: {self.path} holds no run to resume; start it without --resume")
            return
        if self.path.exists() and not self.path.is_dir():
            raise BudgetuneError(f"output.dir {self.path} is a file, not a folder; choose another output.dir")
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise BudgetuneError(
                    f"output folder {self.path} already holds files; use --resume to continue that run, "
                    "--overwrite to replace it, or set output.dir to a new folder"
                )
            if not self.is_run():
                raise BudgetuneError(f"--overwrite: {self.path} is not a budgetune run folder; refusing to delete it "
                                     "(empty it yourself, or set output.dir to a new folder)")

    def prepare(self, resume: bool, overwrite: bool) -> Path | None:
        """Create the folder; call check() first. An old run that overwrite replaces is moved aside
        (returned): the caller deletes it once the new run is under way, or puts it back."""
        previous = None
        if not resume and overwrite and self.path.exists():
            previous = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.path, previous)
        # the folders mkdir creates above the run's own (runs/ of runs/run): discard() removes them again
        object.__setattr__(self, "_made_parents", [p for p in self.path.parents if not p.exists()])
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume:
                (self.path / MARKER).touch()
            return previous
        except OSError as e:
            if previous is not None:
                os.replace(previous, self.path)
            raise BudgetuneError(f"config key 'output.dir': cannot create the run folder {self.path} ({e}); "
                                 "choose a folder you can write to") from None

    def check_unlocked(self) -> None:
        """Refuse a folder that a live trainer holds, changing nothing in it (a run that --overwrite
        may replace stays exactly as it was if the new one fails)."""
        if (self.path / LOCK).exists():
            self.lock().close()

    def lock(self):
        """Become the run folder's one writer: an open file holding an exclusive flock, or a
        BudgetuneError naming the live process that holds it. Keep the returned file open."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise BudgetuneError(f"{self.path} is being written by a live training process ({holder}); wait for it to "
                                 "finish or stop it (Ctrl-C checkpoints it), then --resume") from None
        return handle

    def lock_and_sign(self):
        """lock(), and write this process's id into the lock file for the next one's message."""
        handle = self.lock()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def finished(self) -> bool:
        return self.summary.exists()

    def discard(self, previous: Path | None = None) -> None:
        """Remove the run folder of a run that failed before it got under way, and the parent
        folders prepare() created for it when they are left empty (no empty runs/ behind); then put
        back `previous`, the old run prepare() moved aside for --overwrite, if it is still there."""
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in getattr(self, "_made_parents", []):  # nearest first
            try:
                parent.rmdir()
            except OSError:  # not empty (another run is in it) or already gone
                break
        if previous is not None and previous.exists():
            os.replace(previous, self.path)

    def read_summary(self) -> dict:
        if not self.summary.exists():
            raise BudgetuneError(f"{self.path}: no summary.json — the run has not finished (resume it with train --resume)")
        return json.loads(self.summary.read_text())

    def require_model(self) -> None:
        if not self.model.exists():
            raise BudgetuneError(f"{self.path}: no trained model in {self.model}; finish the run first (train --resume)")
