"""One optimizer step: forward and backward over the step's micro-batches (re-split on
out-of-memory), clipping, the non-finite check, the update and the method's hooks.

The loop (train.py) calls `backward(run, rows)`, records the step on the budget clock (the
learning rate is the schedule at the middle of the progress the step covers), then
`update(run, ..., lr)` and reads the `StepResult`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .errors import TrainingError
from .guard import BadSteps, halve_micro_batch


@dataclass
class StepResult:
    loss: float  # mean loss over the step's target tokens, or pairs for a preference objective (all processes)
    tokens: float  # non-padding tokens in the step (all processes)
    grad_norm: float
    verdict: str  # BadSteps' word: ok, skip, restore, give_up
    fast_forward: tuple[int, float] | None = None  # (repeats, loss) when Fast Forward ran after this step


def forward_backward(run, rows: list[list[int]]) -> tuple[float, float, torch.Tensor]:
    """Forward and backward over one step's micro-batches; (targets, tokens, summed loss)."""
    batches = [run.data.train.batch(r) for r in rows]
    counts = torch.tensor([
        float(sum(run.objective.count(b) for b in batches)),  # target tokens (sft) or pairs (dpo, orpo, simpo)
        float(sum(run.data.train.real_tokens[r].sum() for r in rows)),
    ], device=run.device)
    targets, step_tokens = run.reduce_sum(counts).tolist()
    loss_sum = torch.zeros((), device=run.device)
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else run.accelerator.no_sync(run.model)
        with sync:
            # autocast around the loss too: accelerate autocasts only the model's forward, and the chunked /
            # fused head + loss runs after it (bf16-mixed on a GPU; a no-op otherwise)
            with run.accelerator.autocast():
                loss = run.objective.loss(run.model, {k: v.to(run.device) for k, v in batch.items()})
            loss_sum += loss.detach()
            if run.fused and not torch.isfinite(loss):
                continue  # the update would happen inside backward, before any check
            # sum over tokens / tokens in the whole step: exact mean under accumulation and
            # data parallelism (DDP averages over processes, hence × world)
            objective = loss * run.world / max(targets, 1.0)
            extra = run.method.regularizer(run.raw_model)  # e.g. AdaLoRA's orthogonality penalty, once per step
            run.accelerator.backward(objective if extra is None else objective + extra / len(batches))
    return targets, step_tokens, loss_sum


def backward(run, rows: list[list[int]]) -> tuple[float, float, torch.Tensor]:
    """forward_backward; on out-of-memory the same rows in micro-batches half as large (same
    effective batch, same data order), logged — down to micro-batch 1."""
    while True:
        try:
            return forward_backward(run, rows)
        except torch.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            if len(rows[0]) == 1 or run.fused:
                raise TrainingError(f"out of memory at micro-batch {len(rows[0])}"
                                    + (" with an optimizer that updates inside backward" if run.fused else "")
                                    + f" (seq_len {run.cfg.data.seq_len}); lower data.seq_len, turn on "
                                    "model.gradient_checkpointing, or use an adapter method (see `budgetune plan`)") from None
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            rows = halve_micro_batch(rows)
            run.sampler.micro_batch, run.accum = len(rows[0]), len(rows)
            run.metrics.write(event="out_of_memory", step=run.clock.steps + 1, micro_batch=run.sampler.micro_batch, grad_accum=run.accum)
            run.say(f"step {run.clock.steps + 1}: out of memory; micro-batch now {run.sampler.micro_batch}, accumulation {run.accum}")


def update(run, targets: float, tokens: float, loss_sum: torch.Tensor, lr: float) -> StepResult:
    """Clip, check for non-finite numbers, and apply the update at learning rate `lr`."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # the norm is taken (and non-finite gradients found) even with clipping off
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    grad_norm = float(run.accelerator.clip_grad_norm_(run.model.parameters(), clip))
    loss = run.reduce_sum(loss_sum).item() / max(targets, 1.0)
    verdict = run.bad.record(BadSteps.finite(loss, grad_norm))
    if verdict != "ok":  # a non-finite loss or gradient: no update from this step
        run.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, tokens, grad_norm, verdict)
    fast_forwarding = run.fast_forward is not None and run.fast_forward.due(run.clock.steps)
    if fast_forwarding:
        run.fast_forward.remember(run.trainable_params)
    run.optimizer.step()
    run.method.after_update(run.raw_model, run.cfg.method, run.clock.schedule_progress())  # e.g. AdaLoRA reallocates ranks
    run.optimizer.zero_grad(set_to_none=True)
    ff = run.fast_forward.run(run.trainable_params) if fast_forwarding else None
    if run.method.select(run.raw_model, run.cfg.method, run.clock.steps):  # e.g. LISA samples new layers
        run.rebuild_optimizer()
    return StepResult(loss, tokens, grad_norm, verdict, ff)
