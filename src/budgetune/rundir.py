"""The run folder: where a run's config, metrics, checkpoints and outputs live."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import BudgetuneError


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
            if not self.exists() and not self.metrics.exists():
                raise BudgetuneError(f"--overwrite: {self.path} is not a budgetune run folder; refusing to delete it")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the folder (emptying an old run when overwrite is set); call check() first."""
        if not resume and overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def read_summary(self) -> dict:
        if not self.summary.exists():
            raise BudgetuneError(f"{self.path}: no summary.json — the run has not finished (resume it with train --resume)")
        return json.loads(self.summary.read_text())

    def require_model(self) -> None:
        if not self.model.exists():
            raise BudgetuneError(f"{self.path}: no trained model in {self.model}; finish the run first (train --resume)")
