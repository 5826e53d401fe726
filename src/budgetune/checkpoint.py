"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding:
  trainable.safetensors  the method's saved parameters (full model for full FT and LISA, adapter for LoRA)
  optimizer.pt           optimizer state (loaded with weights_only=True: no code runs)
  rng.safetensors        torch RNG states
  method.safetensors     the method's own tensors beyond parameters (AdaLoRA's importance scores), if any
  state.json             step, budget consumed, schedule progress, data position — written last

It is written into a temporary folder, fsynced, then renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import BudgetuneError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())




def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def save_checkpoint(root: Path, step: int, params: dict, optimizer, state: dict, keep: int = 2,
                    method_tensors: dict | None = None) -> Path:
    """Write checkpoint `step` (named parameters, optimizer, RNG, state) atomically under root; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        if method_tensors:
            save_file({n: t.detach().contiguous().cpu() for n, t in method_tensors.items()}, str(tmp / "method.safetensors"))
        state = dict(state, step=step, python_random=list(random.getstate()[1]))
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        replaced = _retire(final) if final.exists() else None  # re-saving a step (final save right after a periodic one)
        os.rename(tmp, final)
        _fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(_retire(old), ignore_errors=True)
    return final


def _retire(path: Path) -> Path:
    """Rename a checkpoint out of the complete set before deleting it: a kill in the middle of a
    recursive delete must not leave a half-deleted folder that still looks complete."""
    gone = path.with_name(f".tmp-delete-{path.name}-{os.getpid()}")
    os.rename(path, gone)
    return gone


def clean_partial(root: Path) -> None:
    """Remove what a kill left behind: checkpoint writes that never finished, deletes half done."""
    if root.exists():
        for p in [*root.glob(".tmp-step-*"), *root.glob(".tmp-delete-*")]:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def peek_step(path: Path) -> int:
    return json.loads((path / "state.json").read_text())["step"]


def _load_tensors_only(file: Path):
    """A torch.save file through torch's weights-only unpickler: tensors and plain containers
    load; anything that would import or call code (a crafted pickle) is refused, not run."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message starts with advice to load with weights_only=False; keep only what it found
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise BudgetuneError(f"{file}: refusing to load it: it holds more than tensors, and loading it could run code"
                             f"{' (' + found[0] + ')' if found else ''}; delete this checkpoint folder, or start the run "
                             "again without --resume") from None
    except (EOFError, RuntimeError) as e:  # truncated or not a torch file at all
        raise BudgetuneError(f"{file}: not a readable checkpoint file ({e}); delete this checkpoint folder") from None


def load_checkpoint(path: Path, named: dict, optimizer) -> dict:
    """Restore the named parameters, optimizer and RNG from `path`; return its state dict (with the
    method's own tensors under "method_tensors")."""
    params = load_file(str(path / "trainable.safetensors"))
    if set(params) != set(named):
        missing, extra = sorted(set(named) - set(params)), sorted(set(params) - set(named))
        raise BudgetuneError(
            f"checkpoint {path} does not match this model/method (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the run's own config"
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(params[name].to(p.device, p.dtype))
    optimizer.load_state_dict(_load_tensors_only(path / "optimizer.pt"))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    state = json.loads((path / "state.json").read_text())
    random.setstate((3, tuple(state["python_random"]), None))
    method_file = path / "method.safetensors"
    state["method_tensors"] = load_file(str(method_file)) if method_file.exists() else {}
    return state
