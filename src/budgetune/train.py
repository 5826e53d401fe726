"""The training loop: plan → model, data, method, optimizer → train within the budget → eval → save.

`train()` reads top to bottom; everything it calls is a small module of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import time
from pathlib import Path

import torch

from .budget import Budget, BudgetClock
from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, peek_step, save_checkpoint
from .config import Config, dump_config, load_config, parse_interval
from .console import TrainProgress, quiet_libraries, say
from .data import IGNORE, prepare_data
from .data.sampler import RowSampler
from .evaluate import heldout_loss, token_losses
from .fast_forward import FastForward
from .methods import get_method
from .metrics import MetricsLog, check_trackers, environment, flat_config, peak_memory_bytes
from .report import report
from .models import count_parameters, load_model, load_tokenizer
from .optim import build_optimizer, updates_in_backward
from .plan import flops_per_token, matmul_parameters
from .plan.search import plan_for_training
from .plan.throughput import SpeedCalibration
from .errors import BudgetuneError, Interrupted, RunStopped, TrainingError
from .guard import BadSteps, StopSignals, halve_micro_batch
from .rundir import RunDir
from .schedules import lr_multiplier
from .units import format_count, format_duration


REPORT_S = 1.5  # kept back for report.html (matplotlib import + five SVG plots: 0.4–1 s measured on a 2-core CPU)


class Every:
    """A periodic trigger measured in budget progress or in seconds."""

    def __init__(self, interval, start_p: float = 0.0, start_s: float = 0.0):
        self.kind, self.value = parse_interval(interval) or (None, 0.0)
        self.last = start_p if self.kind == "progress" else start_s

    def due(self, p: float, elapsed: float) -> bool:
        now = p if self.kind == "progress" else elapsed
        if self.kind is None or now - self.last < self.value - 1e-9:
            return False
        self.last = now
        return True


def _accelerator(cfg: Config, run: RunDir):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() and cfg.model.dtype in ("auto", "bfloat16") else "no"
    trackers = check_trackers(cfg.tracking)
    return Accelerator(mixed_precision=precision, cpu=not cuda, log_with=trackers or None,
                       project_dir=str(run.path / "tracking") if trackers else None)


def _save_final(run: RunDir, method, model, tokenizer) -> None:
    """The trained result in Hugging Face format, written beside and renamed into place."""
    tmp = run.path / ".tmp-model"
    if tmp.exists():
        shutil.rmtree(tmp)
    method.save_pretrained(model, tmp)
    tokenizer.save_pretrained(str(tmp))
    if run.model.exists():
        shutil.rmtree(run.model)
    os.replace(tmp, run.model)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train(config: str | Path | dict | Config | None = None, overrides=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train within the budget; return the run summary (also written to RUN_DIR/summary.json)."""
    cfg = load_config(config, overrides)
    quiet_libraries()
    run = RunDir(Path(cfg.output.dir))
    accelerator = _accelerator(cfg, run)
    main = accelerator.is_main_process
    overwrite = overwrite or cfg.output.overwrite
    if resume and not run.exists() and run.is_run():  # stopped before its config was written: nothing to resume yet
        resume, overwrite = False, True
    run.check(resume, overwrite)
    accelerator.wait_for_everyone()  # every process has looked at the folder before the main one writes to it
    previous = run.prepare(resume, overwrite) if main else None  # an old run that --overwrite replaces, set aside

    def under_way() -> None:
        """Config and data are good: the replaced run can go."""
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    accelerator.wait_for_everyone()
    try:
        return _train(cfg, run, accelerator, resume, show=main and not quiet, under_way=under_way)
    except RunStopped:
        raise  # it left a checkpoint: keep the folder
    except BaseException as e:
        # bad config or data found after the folder was made, or a failure before the run got under
        # way: leave nothing behind, and put back the run --overwrite was replacing
        if main and not resume and (isinstance(e, BudgetuneError) or (previous is not None and previous.exists())):
            run.discard()  # and the empty parent folders it made
            if previous is not None and previous.exists():
                os.replace(previous, run.path)
        raise


def _train(cfg: Config, run: RunDir, accelerator, resume: bool, show: bool, under_way=lambda: None) -> dict:
    """The run itself: setup, the loop, the final eval and save."""
    main, world, rank, device = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index, accelerator.device
    log = (lambda m: say(m)) if show else (lambda m: None)

    # --- plan: fill in what the config leaves open, and predict memory and speed ----------------
    cfg, prediction = plan_for_training(cfg, log=log)
    speed = SpeedCalibration(prediction)  # the tokens/s guess, calibrated from the first steps

    # --- model, method, optimizer ----------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(cfg, log=log)
    method = get_method(cfg.method.name)
    model = load_model(cfg, tokenizer, device, frozen_base=method.adapter)
    if method.output == "adapter" and cfg.model.init == "scratch" and main and not resume:
        model.save_pretrained(str(run.base))  # the adapter's base must be reloadable
    model = method.prepare(model, cfg.method)
    if updates_in_backward(cfg.optim) and world > 1:
        raise BudgetuneError(f"optim.{'name lomo' if cfg.optim.name == 'lomo' else 'layerwise'} updates weights inside backward, "
                             "before data parallel averages the gradients; run it on one process")
    if method.switches and world > 1:
        raise BudgetuneError(f"method {cfg.method.name!r} changes its trainable layers during training, which "
                             "distributed data parallel cannot follow; run it on one process")
    if resume and main:
        clean_partial(run.checkpoints)  # what a kill during a checkpoint write left behind
    latest = list_checkpoints(run.checkpoints)[-1] if resume and list_checkpoints(run.checkpoints) else None
    method.select(model, cfg.method, peek_step(latest) if latest else 0)  # what trains at the (re)start
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    n_matmul, n_matmul_trainable = matmul_parameters(model)
    fpt = flops_per_token(model.config, cfg.data.seq_len, n_matmul, n_matmul_trainable)
    optimizer = build_optimizer(model, cfg.optim, method.lr_scales(cfg.method))
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    log(f"model: {format_count(total)} parameters, {format_count(trainable)} trainable ({cfg.method.name}); device {device}, {world} process(es)")

    # --- the budget clock starts here: data preparation counts against it -------------------
    clock = BudgetClock(Budget.from_config(cfg.budget), fpt)
    started_at = time.time()
    with accelerator.main_process_first():
        data = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=log)
    if accelerator.is_main_process:
        under_way()
    log(f"data: {data.train_examples} {data.format} examples → {len(data.train)} rows of {cfg.data.seq_len} "
        f"({data.summary()['train_tokens']} tokens, padding {100 * data.train.padding_fraction:.1f}%), "
        f"{data.eval_examples} held out")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    sampler = RowSampler(len(data.train), cfg.train.micro_batch, cfg.train.seed, world, rank)
    accum = cfg.train.grad_accum
    bad = BadSteps(cfg.train.max_bad_steps)
    state: dict = {}
    if main and not resume:
        dump_config(cfg, run.config)
    if latest is not None:
        state = load_checkpoint(latest, method.saved_parameters(raw_model), optimizer)
        clock.load_state_dict(state["clock"])
        sampler.position = state["data_position"]
        sampler.micro_batch, accum = state.get("micro_batch", sampler.micro_batch), state.get("grad_accum", accum)  # after an OOM
        bad.load_state_dict(state.get("bad_steps", bad.state_dict()))
        method.load_state_dict(raw_model, state["method_tensors"], state.get("method", {}))
        log(f"resumed from {latest} (step {clock.steps}, {format_duration(clock.elapsed())} of budget used)")

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, "sum") if world > 1 else t

    eval_rows, fast_forward = data.eval, None
    if cfg.train.fast_forward:  # its judge: the last few held-out rows, kept out of the reported eval
        n_ff = cfg.train.fast_forward_rows
        if data.eval is None or len(data.eval) <= n_ff:
            raise BudgetuneError(f"config key 'train.fast_forward': needs more than train.fast_forward_rows ({n_ff}) held-out "
                                 f"rows, the data gives {0 if data.eval is None else len(data.eval)}; raise data.eval_fraction")
        eval_rows, ff_rows = data.eval.take(range(len(data.eval) - n_ff)), data.eval.take(range(len(data.eval) - n_ff, len(data.eval)))
        fast_forward = FastForward(
            cfg.train.fast_forward,
            loss=lambda: heldout_loss(model, ff_rows, cfg.train.micro_batch, n_ff * cfg.data.seq_len, device, world, rank, reduce_sum),
            keep_going=lambda: not clock.should_stop())

    def eval_loss() -> float:
        return heldout_loss(model, eval_rows, cfg.train.micro_batch, cfg.eval.max_tokens, device, world, rank, reduce_sum)

    # an eval at the start gives the "before" loss and measures what the final eval will cost
    t = time.monotonic()
    measured_before = eval_loss()
    loss_before = state.get("eval_loss_before", measured_before)
    eval_cost = time.monotonic() - t
    if cfg.tracking:
        accelerator.init_trackers(run.path.name, config=flat_config(cfg))
    metrics = MetricsLog(run.metrics if main else None, tracker=accelerator.log if cfg.tracking else None)
    metrics.write(event="eval", step=clock.steps, tokens=clock.tokens, seconds=round(clock.elapsed(), 3), eval_loss=measured_before)
    bytes_to_save = 4 * (3 * trainable + total)  # trainable + Adam moments + final model, fp32
    save_rate = 200e6  # bytes/s until a checkpoint has been timed

    def update_reserve() -> None:
        """Keep back what the final eval and save will cost, as last measured (+1 s for the summary and exit)."""
        clock.set_reserve(1.1 * eval_cost + bytes_to_save / save_rate + 1.0 + (REPORT_S if cfg.output.report else 0.0))

    update_reserve()

    def checkpoint(step: int) -> None:
        nonlocal save_rate
        t = time.monotonic()
        if main:
            params = method.saved_parameters(raw_model)
            if not all(torch.isfinite(p).all() for p in params.values()):
                raise TrainingError(f"step {step}: the weights hold NaN or inf; not checkpointing them (the last checkpoint "
                                    f"in {run.checkpoints} is kept). Lower optim.lr or raise optim.grad_clip, then --resume")
            method_tensors, method_info = method.state_dict(raw_model)
            try:
                save_checkpoint(run.checkpoints, step, params, optimizer, {
                    "clock": clock.state_dict(), "data_position": sampler.position, "eval_loss_before": loss_before,
                    "method": method_info, "bad_steps": bad.state_dict(), "micro_batch": sampler.micro_batch, "grad_accum": accum,
                }, keep=cfg.checkpoint.keep, method_tensors=method_tensors)
            except OSError as e:  # disk full, read-only, quota: the previous checkpoint is untouched
                previous = list_checkpoints(run.checkpoints)
                raise TrainingError(
                    f"could not write the step-{step} checkpoint under {run.checkpoints}: {e.strerror or e}. "
                    + (f"The previous checkpoint {previous[-1].name} is intact: free space (or fix permissions) and --resume."
                       if previous else "No earlier checkpoint exists: free space (or fix permissions) and start again.")) from e
        accelerator.wait_for_everyone()
        save_rate = 4 * (3 * trainable) / max(1e-3, time.monotonic() - t)
        update_reserve()

    eval_every = Every(cfg.eval.every, clock.progress(), clock.elapsed())
    ckpt_every = Every(cfg.checkpoint.every, clock.progress(), clock.elapsed())
    lr, loss_value, tokens_per_s = 0.0, float("nan"), 0.0
    fused = updates_in_backward(cfg.optim)  # LOMO / layer-wise: a bad loss must not reach backward
    stopping = torch.zeros(1, device=device)
    step_rates: list[float] = []  # tokens/s of each optimizer step (periodic evals and saves excluded)
    previous_step_s = 0.0
    p_before = clock.progress()
    model.train()
    log(f"budget: {clock.budget.describe()} (reserve {clock.reserve_s:.1f}s for final eval + save); eval loss before {loss_before:.4f}")

    def forward_backward(rows: list[list[int]]) -> tuple[float, float, torch.Tensor]:
        """Forward and backward over one step's micro-batches; (targets, tokens, summed loss)."""
        batches = [data.train.batch(r) for r in rows]
        counts = torch.tensor([
            float(sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches)),
            float(sum(data.train.real_tokens[r].sum() for r in rows)),
        ], device=device)
        targets, step_tokens = reduce_sum(counts).tolist()
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                loss, _ = token_losses(model, {k: v.to(device) for k, v in batch.items()})
                loss_sum += loss.detach()
                if fused and not torch.isfinite(loss):
                    continue  # the update would happen inside backward, before any check
                # sum over tokens / tokens in the whole step: exact mean under accumulation and
                # data parallelism (DDP averages over processes, hence × world)
                objective = loss * world / max(targets, 1.0)
                extra = method.regularizer(raw_model)  # e.g. AdaLoRA's orthogonality penalty, once per step
                accelerator.backward(objective if extra is None else objective + extra / len(batches))
        return targets, step_tokens, loss_sum

    def restore_last_checkpoint() -> None:
        """Back to the last checkpoint's weights and optimizer state (budget and data go on)."""
        nonlocal optimizer
        last = list_checkpoints(run.checkpoints)[-1]
        if method.select(raw_model, cfg.method, peek_step(last)):
            optimizer = accelerator.prepare(build_optimizer(raw_model, cfg.optim, method.lr_scales(cfg.method)))
        load_checkpoint(last, method.saved_parameters(raw_model), optimizer)

    # --- the loop -------------------------------------------------------------------------
    with TrainProgress(enabled=show) as bar, StopSignals() as signals:
        while True:
            stopping.fill_(2.0 if signals.received else float(clock.should_stop()))
            if world > 1:
                stopping = accelerator.reduce(stopping, "max")  # every process stops at the same step
            if stopping.item() >= 2:  # SIGINT / SIGTERM (pre-emption, Ctrl-C): checkpoint, then leave
                checkpoint(clock.steps)
                metrics.close()
                raise Interrupted(f"{signals.name if signals.received else 'a stop signal'} at step {clock.steps}: checkpoint "
                                  f"written to {run.checkpoints}; continue with `budgetune train ... --resume`",
                                  signals.received or signal.SIGTERM)
            if stopping.item():
                break
            t0 = time.monotonic()
            rows = [sampler.next() for _ in range(accum)]
            while True:
                try:
                    targets, step_tokens, loss_sum = forward_backward(rows)
                    break
                except torch.OutOfMemoryError:
                    # the same rows in micro-batches half as large: same effective batch, same data order
                    optimizer.zero_grad(set_to_none=True)
                    if len(rows[0]) == 1 or fused:
                        raise TrainingError(f"out of memory at micro-batch {len(rows[0])}"
                                            + (" with an optimizer that updates inside backward" if fused else "")
                                            + f" (seq_len {cfg.data.seq_len}); lower data.seq_len, turn on "
                                            "model.gradient_checkpointing, or use an adapter method (see `budgetune plan`)") from None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows = halve_micro_batch(rows)
                    sampler.micro_batch, accum = len(rows[0]), len(rows)
                    metrics.write(event="out_of_memory", step=clock.steps + 1, micro_batch=sampler.micro_batch, grad_accum=accum)
                    bar.log(f"step {clock.steps + 1}: out of memory; micro-batch now {sampler.micro_batch}, accumulation {accum}")
            # the step-time estimate (used to stop on time) is the previous step's full duration,
            # optimizer included; the first step has only its forward and backward to go by
            clock.record_step(step_tokens, previous_step_s or time.monotonic() - t0)
            p = clock.progress()
            # the LR of a step is the schedule at the middle of the progress it covers: neither
            # the first step (warmup) nor the last (annealed to zero) is wasted at lr = 0
            lr = cfg.optim.lr * bad.lr_factor * lr_multiplier(0.5 * (p_before + p), cfg.schedule)
            p_before = p
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            # the norm is taken (and non-finite gradients found) even with clipping off
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            loss_value = reduce_sum(loss_sum).item() / max(targets, 1.0)
            verdict = bad.record(BadSteps.finite(loss_value, grad_norm))
            if verdict != "ok":  # a non-finite loss or gradient: no update from this step
                optimizer.zero_grad(set_to_none=True)
                metrics.write(event="bad_step", step=clock.steps, in_a_row=bad.in_a_row, total=bad.total, action=verdict)
                bar.log(f"step {clock.steps}: non-finite loss or gradient; step skipped ({bad.total} so far)")
                if verdict == "restore" and list_checkpoints(run.checkpoints):
                    restore_last_checkpoint()
                    bar.log(f"{bad.limit} bad steps in a row: back to {list_checkpoints(run.checkpoints)[-1].name}, "
                            f"learning rate × {bad.lr_factor:g}")
                elif verdict != "skip":
                    raise TrainingError(
                        f"{bad.limit} steps in a row with a non-finite loss or gradient at step {clock.steps}"
                        + (" even after going back to the last checkpoint with a halved learning rate" if verdict == "give_up"
                           else " before the first checkpoint")
                        + ": lower optim.lr, raise schedule.warmup, or check the data; saved weights are all finite")
                previous_step_s = time.monotonic() - t0
                continue
            fast_forwarding = fast_forward is not None and fast_forward.due(clock.steps)
            if fast_forwarding:
                fast_forward.remember(trainable_params)
            optimizer.step()
            method.after_update(raw_model, cfg.method, p)  # e.g. AdaLoRA reallocates ranks (needs the gradients)
            optimizer.zero_grad(set_to_none=True)
            if fast_forwarding:
                repeats, ff_loss = fast_forward.run(trainable_params)
                metrics.write(event="fast_forward", step=clock.steps, repeats=repeats, ff_loss=ff_loss)
            if method.select(raw_model, cfg.method, clock.steps):  # e.g. LISA samples new layers
                optimizer = accelerator.prepare(build_optimizer(raw_model, cfg.optim, method.lr_scales(cfg.method)))

            seconds = previous_step_s = time.monotonic() - t0
            tokens_per_s = step_tokens / max(seconds, 1e-9)
            step_rates.append(tokens_per_s)
            if note := speed.record(tokens_per_s):
                bar.log(note)
            metrics.write(step=clock.steps, tokens=clock.tokens, seconds=round(clock.elapsed(), 3), progress=round(p, 5),
                          loss=loss_value, lr=lr, tokens_per_s=round(tokens_per_s, 1), grad_norm=float(grad_norm),
                          memory_mb=round(peak_memory_bytes(device) / 2**20, 1), epoch=round(sampler.epoch, 4))
            bar.update(p, clock.steps, loss_value, lr, tokens_per_s, clock.time_left(), clock.governing())

            time_left = clock.time_left()
            time_left_for_extras = (math.inf if time_left is None else time_left) - clock.reserve_s
            if eval_every.due(p, clock.elapsed()) and p < 1.0 and time_left_for_extras > 2 * eval_cost:
                t = time.monotonic()
                eval_value = eval_loss()
                eval_cost = time.monotonic() - t
                update_reserve()
                metrics.write(event="eval", step=clock.steps, tokens=clock.tokens, seconds=round(clock.elapsed(), 3), eval_loss=eval_value)
                bar.log(f"step {clock.steps}: eval loss {eval_value:.4f}")
            if ckpt_every.due(p, clock.elapsed()) and p < 1.0 and time_left_for_extras > 2 * bytes_to_save / save_rate:
                checkpoint(clock.steps)

    # --- final eval and save: inside the budget, paid for by the reserve ------------------------
    loss_after = eval_loss()
    metrics.write(event="eval", step=clock.steps, tokens=clock.tokens, seconds=round(clock.elapsed(), 3), eval_loss=loss_after)
    checkpoint(clock.steps)
    if main:
        _save_final(run, method, raw_model, tokenizer)
    elapsed = clock.elapsed()
    budget_s = clock.budget.time_s
    summary = {
        "run_dir": str(run.path),
        "method": cfg.method.name,
        "budget": {k: v for k, v in vars(clock.budget).items() if v is not None},
        "governing_budget": clock.governing(),
        "steps": clock.steps,
        "tokens": clock.tokens,
        "flops": clock.tokens * fpt,
        "flops_per_token": fpt,
        "started_at": started_at,  # wall clock when the budget clock started (after model load)
        "elapsed_s": round(elapsed, 3),
        "overshoot_s": round(elapsed - budget_s, 3) if budget_s is not None else None,
        "tokens_per_s": round(clock.tokens / max(1e-9, elapsed), 1),
        "train_tokens_per_s_last": round(tokens_per_s, 1),
        "train_tokens_per_s_median": round(statistics.median(step_rates), 1) if step_rates else None,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "uniform_loss": math.log(len(tokenizer)),
        "final_train_loss": loss_value,
        "final_lr": lr,
        "parameters": total,
        "trainable_parameters": trainable,
        "peak_memory_mb": round(peak_memory_bytes(device) / 2**20, 1),
        "predicted": speed.annotate(prediction),  # the planner's numbers for this recipe, each tokens/s labelled
        "recipe": {"method": cfg.method.name, "micro_batch": sampler.micro_batch, "grad_accum": accum,
                   "gradient_checkpointing": cfg.model.gradient_checkpointing},
        "epochs": round(sampler.epoch, 4),
        "fast_forward_repeats": fast_forward.repeats if fast_forward else None,
        "bad_steps": bad.total,
        "restores": bad.restores,
        "world_size": world,
        "data": data.summary(),
        "environment": environment(device),
    }
    metrics.close()
    if main:
        _write_json(run.summary, summary)
        if cfg.output.report:
            report([run.path])  # RUN_DIR/report.html (its cost is in the reserve)
        log(f"done in {format_duration(elapsed)}"
            + (f" (budget {format_duration(budget_s)}, overshoot {summary['overshoot_s']:+.2f}s)" if budget_s else "")
            + f": {clock.steps} steps, {format_count(clock.tokens)} tokens, eval loss {loss_before:.4f} → {loss_after:.4f}; run folder {run.path}")
        if prediction:
            log(f"planner: peak memory {prediction['peak_memory_mb']:.0f} MB predicted ({prediction.get('peak_memory_basis', 'live tensors')}), "
                f"{summary['peak_memory_mb']:.0f} MB measured (peak RSS); "
                + speed.describe(summary["train_tokens_per_s_median"]))
    if cfg.tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return summary
