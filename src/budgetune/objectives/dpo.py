"""DPO (Rafailov et al. 2023): −log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]).

The reference π_ref is the model as training starts:
- adapter methods whose adapter starts as a no-op (LoRA, DoRA, IA3, VeRA, AdaLoRA, ... — checked on
  one batch): the same model with its adapters disabled (peft's `disable_adapter()`), one extra
  forward per step without gradients and no second copy of the weights;
- everything else (full fine-tuning, freeze, LISA, PiSSA / LoftQ, whose adapters start non-zero):
  the reference log-probs of every training and held-out pair, computed once before the first step
  (the time is paid from the budget: the clock runs) and kept in RUN_DIR/reference_logps.npz, so
  a resumed run reads them back instead of computing them again.
The loss is TRL's DPOTrainer "sigmoid" loss (tests/test_preference.py compares them); rewards are
β(log π − log π_ref).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BudgetuneError
from .base import PreferenceObjective, pair_logps

REFERENCE_FILE = "reference_logps.npz"
REFERENCE_MODE = "reference.json"


class DPO(PreferenceObjective):
    name = "dpo"
    mode = "adapter"  # or "cached"

    def pair_losses(self, logps, lengths, reference):
        return dpo_loss(logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1], self.beta)

    def reference(self, model, batch, segments):
        if self.mode != "adapter":
            raise BudgetuneError("DPO: no cached reference log-probs for these rows")  # a bug, not bad input
        with torch.no_grad(), disabled_adapter(model):
            return pair_logps(model, batch, segments)[0]

    def prepare(self, run) -> None:
        super().prepare(run)
        decided = run.dir.path / REFERENCE_MODE
        if decided.exists():  # a resumed run: the choice its first attempt made (its adapter has trained since)
            self.mode = json.loads(decided.read_text())["mode"]
        else:
            self.mode = "adapter" if adapter_is_reference(run.raw_model, run.data.eval or run.data.train, run.device) else "cached"
            if run.main:
                _write(decided, json.dumps({"mode": self.mode}).encode())
        if self.mode == "adapter":
            run.say("DPO reference: the model with its adapters disabled (one forward without gradients per micro-batch)")
            return
        path = run.dir.path / REFERENCE_FILE
        if path.exists():
            saved = np.load(path)
            run.data.train.reference = saved["train"]
            if run.data.eval is not None:
                run.data.eval.reference = saved["eval"]
            run.say(f"DPO reference log-probs read from {path}")
            return
        t = time.monotonic()
        sets = {"train": run.data.train} if run.data.eval is None else {"train": run.data.train, "eval": run.data.eval}
        for rows in sets.values():
            rows.reference = reference_logps(run.model, rows, run.cfg.train.micro_batch, run.device)
        if run.main:
            import io

            buffer = io.BytesIO()
            np.savez(buffer, **{k: v.reference for k, v in sets.items()})
            _write(path, buffer.getvalue())
        pairs = sum(int(v.pairs.sum()) for v in sets.values())
        run.say(f"DPO reference: log-probs of {pairs} pairs computed once in {time.monotonic() - t:.1f}s (paid from the budget)")


    def prepare_eval(self, run_dir, rows, own_split: bool) -> None:
        decided = run_dir / REFERENCE_MODE
        self.mode = json.loads(decided.read_text())["mode"] if decided.exists() else "adapter"
        if self.mode == "adapter" or rows is None:
            return
        if not own_split:
            raise BudgetuneError(f"{run_dir}: this DPO run's reference log-probs were computed once, for its own data; "
                                 "evaluate it on its held-out split (without --data)")
        saved = np.load(run_dir / REFERENCE_FILE)["eval"]
        if saved.shape[0] != len(rows):
            raise BudgetuneError(f"{run_dir / REFERENCE_FILE}: holds the reference of {saved.shape[0]} held-out rows, the data "
                                 f"now give {len(rows)}; the data changed since training")
        rows.reference = saved


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """(losses, chosen rewards, rejected rewards) from summed answer log-probs of policy and reference."""
    chosen_r, rejected_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_r - rejected_r), chosen_r.detach(), rejected_r.detach()


def disabled_adapter(model):
    inner = getattr(model, "module", model)
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def adapter_is_reference(model, rows, device, micro_batch: int = 2) -> bool:
    """True when disabling the adapters gives the model's own function now (the adapter starts as a
    no-op), checked on one micro-batch; False for models without peft adapters."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "disable_adapter") or rows is None or len(rows) == 0:
        return False
    was_training = model.training
    model.eval()
    batch = {k: v.to(device) for k, v in rows.batch(list(range(min(micro_batch, len(rows))))).items()}
    segments = batch.pop("segments")
    batch.pop("reference_logps", None)
    own = pair_logps(model, batch, segments)[0]
    with inner.disable_adapter():
        base = pair_logps(model, batch, segments)[0]
    model.train(was_training)
    return bool(torch.allclose(own, base, rtol=1e-5, atol=1e-4))


@torch.no_grad()
def reference_logps(model, rows, micro_batch: int, device) -> np.ndarray:
    """[rows, most pairs in a row, 2] summed (chosen, rejected) answer log-probs under `model` as it is now."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(rows), max(1, int(rows.pairs.max())), 2), dtype=np.float32)
    for start in range(0, len(rows), micro_batch):
        idx = list(range(start, min(start + micro_batch, len(rows))))
        batch = {k: v.to(device) for k, v in rows.batch(idx).items() if k != "reference_logps"}
        segments = batch.pop("segments")
        logps = pair_logps(model, batch, segments)[0].float().cpu().numpy()
        at = 0
        for r, k in zip(idx, rows.pairs[idx].tolist()):
            out[r, :k] = logps[at : at + k]
            at += k
    model.train(was_training)
    return out


def _write(path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
