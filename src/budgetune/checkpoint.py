"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding:
  trainable.safetensors  the method's saved parameters (full model for full FT and LISA, adapter for LoRA)
  optimizer.pt           optimizer state (loaded with weights_only=True: no code runs)
  rng.safetensors        torch RNG states
  method.safetensors     the method's own tensors beyond parameters (AdaLoRA's importance scores), if any
  state.json             step, budget consumed, schedule progress, data position, and the
                         size of every file above (a damaged file is found on load) — written last

It is written into a temporary folder, fsynced, then renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn one. A file the disk
damaged later (truncated, overwritten) makes `newest_intact` skip that checkpoint, naming it.
`Checkpointer` writes them for the loop — in the background where that pays — and knows what one costs.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import statistics
import threading
import time
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
                    method_tensors: dict | None = None, rng: dict | None = None) -> Path:
    """Write checkpoint `step` (named parameters, optimizer, RNG, state) atomically under root; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng if rng is not None else rng_state(), str(tmp / "rng.safetensors"))
        if method_tensors:
            save_file({n: t.detach().contiguous().cpu() for n, t in method_tensors.items()}, str(tmp / "method.safetensors"))
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
        state = dict(state, step=step, python_random=state.get("python_random", list(random.getstate()[1])), file_sizes=sizes)
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


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (a file missing, of the wrong size, or unreadable), or None."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({e})"
    for name, size in state.get("file_sizes", {}).items():
        f = path / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written"
    for name in ("trainable.safetensors", "rng.safetensors", "method.safetensors"):
        if (path / name).exists():
            try:
                with open(path / name, "rb") as handle:  # the header must parse: safetensors' own check of the layout
                    n = int.from_bytes(handle.read(8), "little")
                    json.loads(handle.read(n))
            except (OSError, ValueError) as e:
                return f"{path / name} is not a readable safetensors file ({e})"
    return None


def newest_intact(root: Path, say=lambda m: None) -> Path | None:
    """The newest checkpoint whose files are whole; damaged newer ones are named and skipped."""
    for path in reversed(list_checkpoints(root)):
        why = damage(path)
        if why is None:
            return path
        say(f"checkpoint {path.name} is damaged ({why}); skipping it")
    return None


class Checkpointer:
    """Writes the run's checkpoints and knows what one costs.

    A write first snapshots the tensors to CPU memory (cheap), then — in `background` mode —
    writes them from a thread while the loop trains on (DataStates-LLM's lazy asynchronous
    checkpointing, METHODS.md §6); the next save, a restore and the end of the run wait for the
    write in flight, and its error (disk full) is raised there. `background="auto"` turns that on
    once a write has been measured at ≥ 1 s: for small writes a thread does not pay. Costs are
    medians of what was measured, so one slow write does not inflate the reserve for the rest
    of the run.
    """

    BACKGROUND_AFTER_S = 1.0

    def __init__(self, root: Path, keep: int, background: bool | str = "auto", guess_s: float = 1.0):
        self.root, self.keep, self.background = root, keep, background
        self.guess_s = guess_s  # until a write has been timed
        self.blocking: list[float] = []  # seconds the loop waited per save
        self.writes: list[float] = []  # seconds per complete write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _in_background(self) -> bool:
        if self.background == "auto":
            return bool(self.writes) and statistics.median(self.writes) >= self.BACKGROUND_AFTER_S
        return bool(self.background)

    def save(self, step: int, params: dict, optimizer, state: dict, method_tensors: dict | None = None, wait: bool = False) -> None:
        self.wait()
        started = time.monotonic()
        background = self._in_background() and not wait
        if background:  # snapshot now (the loop changes the live tensors next step), write later
            params = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
            optimizer = _Snapshot(_copy_tensors(optimizer.state_dict()))
            method_tensors = {n: t.detach().to("cpu", copy=True) for n, t in (method_tensors or {}).items()}
            rng = rng_state()
            state = dict(state, python_random=list(random.getstate()[1]))

            def write():
                try:
                    t = time.monotonic()
                    save_checkpoint(self.root, step, params, optimizer, state, self.keep, method_tensors, rng=rng)
                    self.writes.append(time.monotonic() - t)
                except BaseException as e:  # raised by the next wait()
                    self._error = e

            self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            save_checkpoint(self.root, step, params, optimizer, state, self.keep, method_tensors)
            self.writes.append(time.monotonic() - started)
        self.blocking.append(time.monotonic() - started)

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def cost_s(self) -> float:
        """What one more save will cost the loop (median of measured saves)."""
        return statistics.median(self.blocking) if self.blocking else self.guess_s

    def final_cost_s(self) -> float:
        """What the final (waited-for) save will cost: a whole write."""
        return statistics.median(self.writes) if self.writes else self.guess_s


class _Snapshot:
    """Stands in for an optimizer whose state_dict was copied."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _copy_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(v) for v in obj)
    return obj


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
