"""The training loop.

    train()   the run folder: one writer, --resume / --extend / --overwrite rules, cleanup on bad input
    setup()   a `Run`: plan → model, method, optimizer → budget clock → data → resume state → first eval
    fit()     the loop: one optimizer step after another until the budget (or a signal) says stop
    finish()  final eval, checkpoint, model, summary, report — inside the budget's reserve

Each concern has one home: the step (forward/backward with its out-of-memory retry, the update,
the method's hooks) is step.py; when to stop and what to keep back is budget.py; checkpoints are
checkpoint.py; a `Run` holds the state they share.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import step as steps
from .budget import Budget, BudgetClock, Every, auto_checkpoint_interval, auto_eval_interval
from .checkpoint import Checkpointer, clean_partial, list_checkpoints, load_checkpoint, newest_intact, peek_step
from .config import Config, dump_config, load_config
from .console import TrainProgress, quiet_libraries, say
from .data import prepare_data
from .data.sampler import RowSampler
from .data.select import tokens_in_budget
from .errors import BudgetuneError, Interrupted, RunStopped, TrainingError
from .evaluate import heldout_loss, heldout_metrics
from .fast_forward import FastForward
from .fastpath import compile_layers, resolve_precision, use_compile
from .fastpath import describe as describe_fast_path
from .guard import BadSteps, StopSignals
from .methods import get_method
from .objectives import Objective, get_objective
from .objectives.sft import SFT
from .metrics import MetricsLog, check_trackers, environment, flat_config, peak_memory_bytes
from .models import count_parameters, load_model, load_tokenizer
from .optim import build_optimizer, updates_in_backward
from .plan import flops_per_token, matmul_parameters
from .plan.search import plan_for_training, step_tokens as tokens_in
from .plan.throughput import reference_flops_per_token
from .plan.throughput import SpeedCalibration
from .report import report
from .rundir import RunDir
from .schedules import lr_multiplier, rewarmed
from .units import format_count, format_duration

REPORT_S = 1.5  # kept back for report.html (matplotlib import + five SVG plots: 0.4–1 s measured on a 2-core CPU)
FEW_STEPS = 10  # a budget that buys fewer optimizer steps than this gets a warning
BUSY_FACTOR = 3.0  # measured steps this many times slower than the probe: the machine is probably busy


def train(config: str | Path | dict | Config | None = None, overrides=None, *, resume: bool = False, extend: bool = False,
          overwrite: bool = False, quiet: bool = False) -> dict:
    """Train within the budget; return the run summary (also written to RUN_DIR/summary.json).

    `resume` continues a stopped run from its newest intact checkpoint; `extend` (with `resume`)
    continues a finished run on a larger budget. One run: tune.fraction is not read here —
    `budgetune train` and `budgetune.train` are tune.train_or_race, which races first when it is set."""
    cfg = load_config(config, overrides)
    quiet_libraries()
    run_dir = RunDir(Path(cfg.output.dir))
    accelerator = _accelerator(cfg, run_dir)
    main = accelerator.is_main_process
    overwrite = overwrite or cfg.output.overwrite
    if resume and not run_dir.exists() and run_dir.is_run():  # stopped before its config was written: nothing to resume yet
        resume, overwrite = False, True
    run_dir.check(resume, overwrite)
    if resume and run_dir.finished() and not extend:
        raise BudgetuneError(_finished_message(run_dir))
    lock = None
    if main:  # one writer per run folder: a live trainer's folder is refused before anything changes
        if resume:
            lock = run_dir.lock_and_sign()
        elif run_dir.path.exists():
            run_dir.check_unlocked()
    accelerator.wait_for_everyone()  # every process has looked at the folder before the main one writes to it
    previous = run_dir.prepare(resume, overwrite) if main else None  # an old run that --overwrite replaces, set aside
    if main and lock is None:
        lock = run_dir.lock_and_sign()
    accelerator.wait_for_everyone()
    try:
        run = setup(cfg, run_dir, accelerator, resume, extend, show=main and not quiet, previous=previous)
        fit(run)
        return finish(run)
    except RunStopped:
        raise  # it left a checkpoint: keep the folder
    except BaseException as e:
        # bad config or data found after the folder was made, or a failure before the run got under
        # way: leave nothing behind, and put back the run --overwrite was replacing
        if main and not resume and (isinstance(e, BudgetuneError) or (previous is not None and previous.exists())):
            run_dir.discard(previous)  # and the empty parent folders it made
        raise
    finally:
        if lock is not None:
            lock.close()


def _finished_message(run_dir: RunDir) -> str:
    summary = run_dir.read_summary()
    budget = ", ".join(f"{k} {v:g}" for k, v in summary.get("budget", {}).items() if isinstance(v, (int, float)))
    return (f"{run_dir.path} is a finished run ({summary['steps']} steps, budget {budget}); --resume continues a stopped one. "
            "To train it further, raise the budget and add --extend: the schedule continues from the progress the new budget "
            "gives (progress = budget used ÷ new budget), so cosine and linear schedules climb back to a higher LR and anneal "
            "again, and WSD continues its stable phase before decaying; or start a new run with --overwrite")


def _accelerator(cfg: Config, run_dir: RunDir):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = "bf16" if resolve_precision(cfg, "cuda" if cuda else "cpu") == "bf16-mixed" else "no"  # pure-bf16: bf16 weights, no autocast
    trackers = check_trackers(cfg.tracking)
    return Accelerator(mixed_precision=precision, cpu=not cuda, log_with=trackers or None,
                       project_dir=str(run_dir.path / "tracking") if trackers else None)


# --- the state a run holds ------------------------------------------------------------------------------


@dataclass
class Run:
    """What setup() builds and the loop, the step and finish() share."""

    cfg: Config
    dir: RunDir
    accelerator: object
    method: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    data: object
    sampler: RowSampler
    accum: int
    clock: BudgetClock
    checkpointer: Checkpointer
    metrics: MetricsLog
    bad: BadSteps
    say: object  # log a line (above the progress bar while it runs)
    fpt: float  # FLOPs per token
    trainable: int
    total: int
    prediction: dict | None
    started_at: float
    show: bool = True  # progress bar and log lines (the main process, unless quiet)
    speed: SpeedCalibration | None = None  # the tokens/s prediction, calibrated from the first steps
    eval_rows: object = None
    fast_forward: FastForward | None = None
    loss_before: float = math.nan
    eval_costs: list[tuple[float, float | None]] = field(default_factory=list)  # (seconds, training tokens/s at the time)
    step_seconds: list[float] = field(default_factory=list)  # wall-clock of each optimizer step
    step_rates: list[float] = field(default_factory=list)  # tokens/s of each optimizer step
    last: steps.StepResult | None = None
    lr: float = 0.0
    rewarm: tuple[float, float] | None = None  # (schedule progress, LR) where a run extended onto a larger budget took up again
    eval_every: Every | None = None
    ckpt_every: Every | None = None
    skipped_evals: int = 0
    warned_busy: bool = False
    objective: Objective = field(default_factory=SFT)  # what the step's loss is (objectives/)
    last_eval: dict = field(default_factory=dict)  # the latest eval's metrics (preference: reward accuracy, margin, ...)

    # shorthands the step uses
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def raw_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def fused(self) -> bool:
        """LOMO / layer-wise: the update happens inside backward, so a bad loss must not reach it."""
        return updates_in_backward(self.cfg.optim)

    @property
    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum") if self.world > 1 else t

    def rebuild_optimizer(self) -> None:
        """A new optimizer for what trains now (LISA switched layers)."""
        self.optimizer = self.accelerator.prepare(build_optimizer(self.raw_model, self.cfg.optim, self.method.lr_scales(self.cfg.method)))

    def next_rows(self) -> list[list[int]]:
        return [self.sampler.next() for _ in range(self.accum)]

    def lr_between(self, q0: float, q1: float) -> float:
        """The LR of a step is the schedule at the middle of the progress it covers: neither the
        first step (warmup) nor the last (annealed to zero) is wasted at lr = 0."""
        q = 0.5 * (q0 + q1)
        lr = self.cfg.optim.lr * self.bad.lr_factor * lr_multiplier(q, self.cfg.schedule)
        return rewarmed(lr, q, *self.rewarm, self.cfg.schedule.warmup) if self.rewarm else lr

    # --- evals and checkpoints: what they cost is what the budget keeps back --------------------------
    def evaluate(self) -> float:
        t = time.monotonic()
        self.last_eval = heldout_metrics(self.model, self.objective, self.eval_rows, self.cfg.train.micro_batch,
                                         self.cfg.eval.max_tokens, self.device, self.world, self.accelerator.process_index,
                                         self.reduce_sum)
        self.eval_costs.append((time.monotonic() - t, self.recent_rate()))
        self.update_reserve()
        self.metrics.write(event="eval", step=self.clock.steps, tokens=self.clock.tokens, seconds=round(self.clock.elapsed(), 3),
                           **self.last_eval)
        return self.last_eval["eval_loss"]

    def recent_rate(self) -> float | None:
        """Training tokens/s over the last few steps: how fast the machine is now."""
        return statistics.median(self.step_rates[-5:]) if self.step_rates else None

    def eval_cost(self) -> float:
        """What one eval costs now: the measured evals (median), each rescaled by how fast the machine
        trains now against when it was measured — an eval timed while other processes held the CPU
        must not hold back a reserve for the rest of the run (the first eval, before any step, is
        rescaled against the first steps)."""
        if not self.eval_costs:
            return 0.0
        now = self.recent_rate()
        if now is None:
            return statistics.median(seconds for seconds, _ in self.eval_costs)
        first = statistics.median(self.step_rates[:5])
        return statistics.median(seconds * (rate or first) / now for seconds, rate in self.eval_costs)

    def update_reserve(self) -> None:
        """Keep back what the final eval and save will cost, as measured (medians: one slow write or eval
        does not inflate the reserve for the rest of the run), + 1 s for the summary and exit. The final
        model folder is priced at the checkpoint's measured rate: a checkpoint holds the trainable
        weights and two Adam moments, the model folder the adapter or every weight."""
        checkpoint_bytes = 12 * max(1, self.trainable)
        model_bytes = 4 * (self.trainable if self.method.output == "adapter" else self.total)
        final_save = self.checkpointer.final_cost_s() * (1.0 + model_bytes / checkpoint_bytes)
        self.clock.set_reserve(1.1 * self.eval_cost() + final_save + 1.0 + (REPORT_S if self.cfg.output.report else 0.0))

    def checkpoint(self, final: bool = False) -> None:
        if self.main:
            params = self.method.saved_parameters(self.raw_model)
            if not all(torch.isfinite(p).all() for p in params.values()):
                raise TrainingError(f"step {self.clock.steps}: the weights hold NaN or inf; not checkpointing them (the last "
                                    f"checkpoint in {self.dir.checkpoints} is kept). Lower optim.lr or raise optim.grad_clip, then --resume")
            method_tensors, method_info = self.method.state_dict(self.raw_model)
            state = {"clock": self.clock.state_dict(), "data_position": self.sampler.position, "eval_loss_before": self.loss_before,
                     "method": method_info, "bad_steps": self.bad.state_dict(), "micro_batch": self.sampler.micro_batch,
                     "grad_accum": self.accum, "lr": self.lr, "budget": asdict(self.clock.budget), "rewarm": self.rewarm}
            try:
                self.checkpointer.save(self.clock.steps, params, self.optimizer, state, method_tensors, wait=final)
                if final:
                    self.checkpointer.wait()
            except OSError as e:  # disk full, read-only, quota: the previous checkpoint is untouched
                previous = list_checkpoints(self.dir.checkpoints)
                raise TrainingError(
                    f"could not write the step-{self.clock.steps} checkpoint under {self.dir.checkpoints}: {e.strerror or e}. "
                    + (f"The previous checkpoint {previous[-1].name} is intact: free space (or fix permissions) and --resume."
                       if previous else "No earlier checkpoint exists: free space (or fix permissions) and start again.")) from e
        self.accelerator.wait_for_everyone()
        self.update_reserve()

    def restore_last_checkpoint(self) -> None:
        """Back to the last checkpoint's weights and optimizer state (budget and data go on)."""
        self.checkpointer.wait()
        last = newest_intact(self.dir.checkpoints, self.say)
        if self.method.select(self.raw_model, self.cfg.method, peek_step(last)):
            self.rebuild_optimizer()
        load_checkpoint(last, self.method.saved_parameters(self.raw_model), self.optimizer)


# --- setup ---------------------------------------------------------------------------------------------------


def setup(cfg: Config, run_dir: RunDir, accelerator, resume: bool, extend: bool, show: bool, previous: Path | None = None) -> Run:
    """Everything the loop needs, from the config; the budget clock starts after model load."""
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    log = (lambda m: say(m)) if show else (lambda m: None)

    # plan: fill in what the config leaves open, and predict memory and speed
    planning_started = time.monotonic()
    cfg, prediction = plan_for_training(cfg, log=log)
    planning_s = time.monotonic() - planning_started  # its speed probe is paid from a time budget

    # model, method, optimizer
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(cfg, log=log)
    method = get_method(cfg.method.name)
    model = load_model(cfg, tokenizer, device, frozen_base=method.adapter)
    if method.output == "adapter" and cfg.model.init == "scratch" and main and not resume:
        model.save_pretrained(str(run_dir.base))  # the adapter's base must be reloadable
    model = method.prepare(model, cfg.method)
    if updates_in_backward(cfg.optim) and world > 1:
        raise BudgetuneError(f"optim.{'name lomo' if cfg.optim.name == 'lomo' else 'layerwise'} updates weights inside backward, "
                             "before data parallel averages the gradients; run it on one process")
    if method.switches and world > 1:
        raise BudgetuneError(f"method {cfg.method.name!r} changes its trainable layers during training, which "
                             "distributed data parallel cannot follow; run it on one process")
    latest = None
    if resume:
        if main:
            clean_partial(run_dir.checkpoints)  # what a kill during a checkpoint write left behind
        accelerator.wait_for_everyone()
        latest = newest_intact(run_dir.checkpoints, log)
        if latest is None and list_checkpoints(run_dir.checkpoints):  # never start over a run whose checkpoints the disk damaged
            raise BudgetuneError(f"every checkpoint in {run_dir.checkpoints} is damaged (see above); delete that folder to start "
                                 "the run again from scratch, or use --overwrite")
        if latest is None:  # killed before its first checkpoint: nothing to continue from
            log("no checkpoint yet — starting fresh")
            resume = False
            if main and run_dir.metrics.exists():
                run_dir.metrics.unlink()  # its steps will be trained again: the metrics start clean
    method.select(model, cfg.method, peek_step(latest) if latest else 0)  # what trains at the (re)start
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if use_compile(cfg, device.type):
        compile_layers(model)
    log(f"fast path: {describe_fast_path(cfg, device.type, model.config._attn_implementation)}")
    trainable, total = count_parameters(model)
    n_matmul, n_matmul_trainable = matmul_parameters(model)
    fpt = flops_per_token(model.config, cfg.data.seq_len, n_matmul, n_matmul_trainable)
    fpt += reference_flops_per_token(model.config, cfg.data.seq_len, n_matmul, cfg.objective.name, cfg.method.name)  # DPO + adapter
    optimizer = build_optimizer(model, cfg.optim, method.lr_scales(cfg.method))
    log(f"model: {format_count(total)} parameters, {format_count(trainable)} trainable ({cfg.method.name}); device {device}, {world} process(es)")

    # the budget clock starts here: data preparation counts against it
    clock = BudgetClock(Budget.from_config(cfg.budget), fpt, spent_s=0.0 if resume else planning_s)
    started_at = time.time()
    with accelerator.main_process_first():
        # data.select scores with the model being trained (its time is paid from the budget: the clock runs)
        data = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=log, model=model, run_dir=run_dir.path,
                            budget_tokens=lambda: tokens_in_budget(cfg, prediction, fpt, clock.elapsed(), world))
    if main and previous is not None:
        shutil.rmtree(previous, ignore_errors=True)  # config and data are good: the replaced run can go
    log(f"data: {data.train_examples} {data.format} examples → {len(data.train)} rows of {cfg.data.seq_len} "
        f"({data.summary()['train_tokens']} tokens, padding {100 * data.train.padding_fraction:.1f}%), "
        f"{data.eval_examples} held out")
    micro_batch, accum = _rows_within_the_data(cfg, len(data.train), world, log)
    model, optimizer = accelerator.prepare(model, optimizer)
    if main and not resume:
        dump_config(cfg, run_dir.config)
    run = Run(cfg=cfg, dir=run_dir, accelerator=accelerator, method=method, model=model, optimizer=optimizer, tokenizer=tokenizer,
              data=data, sampler=RowSampler(len(data.train), micro_batch, cfg.train.seed, world, accelerator.process_index),
              accum=accum, clock=clock, checkpointer=Checkpointer(run_dir.checkpoints, cfg.checkpoint.keep, cfg.checkpoint.background,
                                                                  guess_s=12 * trainable / 200e6 + 0.05),
              metrics=MetricsLog(run_dir.metrics if main else None, tracker=accelerator.log if cfg.tracking else None),
              bad=BadSteps(cfg.train.max_bad_steps), say=log, fpt=fpt, trainable=trainable, total=total,
              prediction=prediction, started_at=started_at, show=show, speed=SpeedCalibration(prediction), eval_rows=data.eval,
              objective=get_objective(cfg))
    state = {}
    if latest is not None:
        state = load_checkpoint(latest, method.saved_parameters(run.raw_model), run.optimizer)
        clock.load_state_dict(state["clock"])
        run.sampler.position = state["data_position"]
        run.sampler.micro_batch, run.accum = state.get("micro_batch", micro_batch), state.get("grad_accum", accum)  # after an OOM
        run.bad.load_state_dict(state.get("bad_steps", run.bad.state_dict()))
        method.load_state_dict(run.raw_model, state["method_tensors"], state.get("method", {}))
        if extend and clock.progress() >= 1.0:
            raise BudgetuneError(f"--extend: the budget ({clock.budget.describe()}) is already spent by the finished run; "
                                 "raise budget.time / budget.tokens / budget.steps / budget.flops to train further")
        log(f"resumed from {latest} (step {clock.steps}, {format_duration(clock.elapsed())} of budget used)")
        run.rewarm = _rewarm(state, clock, cfg.schedule.warmup, log)
    run.objective.prepare(run)  # checks the data; DPO: its reference (log-probs computed once are paid from the budget)
    if cfg.train.fast_forward:  # its judge: the last few held-out rows, kept out of the reported eval
        _split_fast_forward_rows(run)
    if cfg.tracking:
        accelerator.init_trackers(run_dir.path.name, config=flat_config(cfg))
    # an eval at the start gives the "before" loss and measures what the final eval will cost
    measured_before = run.evaluate()
    run.loss_before = state.get("eval_loss_before", measured_before)
    run.eval_every = Every(cfg.eval.every, clock.progress(), clock.elapsed(), auto=auto_eval_interval(clock.budget, run.eval_cost()))
    run.ckpt_every = Every(cfg.checkpoint.every, clock.progress(), clock.elapsed(), auto=auto_checkpoint_interval())
    _check_the_budget_buys_steps(run)
    log(f"budget: {clock.budget.describe()} (reserve {clock.reserve_s:.1f}s for final eval + save); eval loss before {run.loss_before:.4f}")
    return run


def _rows_within_the_data(cfg: Config, n_rows: int, world: int, log) -> tuple[int, int]:
    """(micro-batch, accumulation), shrunk so that one step never holds a row twice."""
    micro_batch, accum = cfg.train.micro_batch, cfg.train.grad_accum
    available = max(1, n_rows // world)
    if micro_batch * accum <= available:
        return micro_batch, accum
    accum = max(1, available // micro_batch)
    micro_batch = min(micro_batch, available)
    log(f"the data has {n_rows} rows: a step of {cfg.train.micro_batch} × {cfg.train.grad_accum} rows per process would repeat "
        f"rows within itself; using {micro_batch} × {accum}")
    return micro_batch, accum


def _split_fast_forward_rows(run: Run) -> None:
    cfg, data = run.cfg, run.data
    n_ff = cfg.train.fast_forward_rows
    if data.eval is None or len(data.eval) <= n_ff:
        raise BudgetuneError(f"config key 'train.fast_forward': needs more than train.fast_forward_rows ({n_ff}) held-out "
                             f"rows, the data gives {0 if data.eval is None else len(data.eval)}; raise data.eval_fraction")
    run.eval_rows, ff_rows = data.eval.take(range(len(data.eval) - n_ff)), data.eval.take(range(len(data.eval) - n_ff, len(data.eval)))
    run.fast_forward = FastForward(
        cfg.train.fast_forward,
        loss=lambda: heldout_loss(run.model, ff_rows, cfg.train.micro_batch, n_ff * cfg.data.seq_len, run.device, run.world,
                                  run.accelerator.process_index, run.reduce_sum),
        keep_going=lambda: not run.clock.should_stop())


def step_tokens(run: Run) -> int:
    """Tokens per optimizer step, all processes (plan.search.step_tokens)."""
    return tokens_in(run.sampler.micro_batch * run.accum * run.world, run.prediction, run.cfg.data.seq_len)


def _check_the_budget_buys_steps(run: Run) -> None:
    """Say before spending a time budget that it cannot buy one optimizer step; warn when it buys few."""
    clock, speed = run.clock, (run.prediction or {}).get("measured_tokens_per_s")
    if clock.budget.time_s is None or not speed:
        return
    tokens = step_tokens(run)
    step_s = tokens / speed
    window = clock.budget.time_s - clock.reserve_s - clock.elapsed()
    if step_s > window:
        raise BudgetuneError(
            f"the time budget cannot buy one optimizer step: of budget.time {clock.budget.time_s:.0f}s, "
            f"{clock.elapsed():.1f}s went to planning, data preparation and the first eval and {clock.reserve_s:.1f}s is kept "
            f"for the final eval + save, leaving {max(0.0, window):.1f}s; one step of {tokens:,} tokens takes ~{step_s:.1f}s "
            f"(measured {speed:,.0f} tokens/s). Raise budget.time (to at least {clock.budget.time_s - window + 3 * step_s:.0f}s), "
            "or lower train.batch_tokens / data.seq_len / eval.max_tokens")
    if window / step_s < FEW_STEPS:
        run.say(f"warning: the budget buys only ~{int(window / step_s)} optimizer steps of {tokens:,} tokens "
                f"(~{step_s:.1f}s each); raise budget.time for a model that learns more")


def _rewarm(state: dict, clock: BudgetClock, warmup: float, log) -> tuple[float, float] | None:
    """Where a resumed run's LR ramps from (schedules.rewarmed). On a larger budget than its checkpoint was trained
    for (--extend, a promoted trial, the race's winner) it ramps from the LR it stopped at — ~0 after a finished
    run's annealing — to the new schedule over schedule.warmup; resumed on its own budget it keeps the ramp it had
    (exact resume). Checkpoints from before this was saved carry no LR: no ramp."""
    if "lr" not in state or state.get("budget") == asdict(clock.budget):
        return tuple(state["rewarm"]) if state.get("rewarm") else None
    if warmup > 0:
        log(f"a new budget ({clock.budget.describe()}): the LR re-warms from {state['lr']:.3g} over the next {100 * warmup:g}% of it")
    return clock.schedule_progress(), state["lr"]


# --- the loop ----------------------------------------------------------------------------------------------------


def fit(run: Run) -> None:
    """Optimizer steps until the budget says stop; periodic evals and checkpoints between them."""
    clock, metrics = run.clock, run.metrics
    run.model.train()
    with TrainProgress(enabled=run.show) as bar, StopSignals() as signals:
        run.say = bar.log if bar.enabled else run.say
        while not _should_stop(run, signals):
            t0 = time.monotonic()
            clock.start_training()  # warmup and the schedule count from the first optimizer step
            q0 = clock.schedule_progress()
            targets, tokens, loss_sum = steps.backward(run, run.next_rows())
            # stopping on time needs the step's duration: the previous one's (optimizer included), or this backward's
            clock.record_step(tokens, run.step_seconds[-1] if run.step_seconds else time.monotonic() - t0)
            run.lr = run.lr_between(q0, clock.schedule_progress())
            result = steps.update(run, targets, tokens, loss_sum, run.lr)
            run.step_seconds.append(time.monotonic() - t0)
            if result.verdict != "ok":
                _bad_step(run, result)
                continue
            run.last = result
            _after_step(run, result, bar)
            _periodic(run)
    run.checkpointer.wait()
    if run.clock.steps == 0:
        raise BudgetuneError(f"the budget ({clock.budget.describe()}) ran out before the first optimizer step: "
                            f"{clock.elapsed():.1f}s went to data preparation and evals with {clock.reserve_s:.1f}s kept for "
                            "the final eval + save; raise the budget or lower data.seq_len / train.batch_tokens (nothing was saved)")


def _should_stop(run: Run, signals: StopSignals) -> bool:
    """Every process stops at the same step: on the budget, or on SIGINT / SIGTERM (checkpoint, then leave)."""
    stopping = torch.tensor([2.0 if signals.received else float(run.clock.should_stop())], device=run.device)
    if run.world > 1:
        stopping = run.accelerator.reduce(stopping, "max")
    if stopping.item() >= 2:
        run.checkpoint(final=True)
        run.metrics.close()
        raise Interrupted(f"{signals.name if signals.received else 'a stop signal'} at step {run.clock.steps}: checkpoint "
                          f"written to {run.dir.checkpoints}; continue with `budgetune train ... --resume`",
                          signals.received or signal.SIGTERM)
    return bool(stopping.item())


def _bad_step(run: Run, result: steps.StepResult) -> None:
    """A non-finite loss or gradient: skipped, counted; after too many, back to the last checkpoint or stop."""
    bad = run.bad
    run.metrics.write(event="bad_step", step=run.clock.steps, in_a_row=bad.in_a_row, total=bad.total, action=result.verdict)
    run.say(f"step {run.clock.steps}: non-finite loss or gradient; step skipped ({bad.total} so far)")
    if result.verdict == "restore" and list_checkpoints(run.dir.checkpoints):
        run.restore_last_checkpoint()
        run.say(f"{bad.limit} bad steps in a row: back to {list_checkpoints(run.dir.checkpoints)[-1].name}, "
                f"learning rate × {bad.lr_factor:g}")
    elif result.verdict != "skip":
        raise TrainingError(
            f"{bad.limit} steps in a row with a non-finite loss or gradient at step {run.clock.steps}"
            + (" even after going back to the last checkpoint with a halved learning rate" if result.verdict == "give_up"
               else " before the first checkpoint")
            + ": lower optim.lr, raise schedule.warmup, or check the data; saved weights are all finite")


def _after_step(run: Run, result: steps.StepResult, bar: TrainProgress) -> None:
    """Log the step; warn once when the machine is far slower than the probe measured."""
    clock = run.clock
    tokens_per_s = result.tokens / max(run.step_seconds[-1], 1e-9)
    run.step_rates.append(tokens_per_s)
    if note := run.speed.record(tokens_per_s):
        run.say(note)
    run.update_reserve()  # the machine's speed changes what the final eval will cost
    if result.fast_forward is not None:
        run.metrics.write(event="fast_forward", step=clock.steps, repeats=result.fast_forward[0], ff_loss=result.fast_forward[1])
    preference = run.objective.step_metrics()  # reward accuracy, margin, log-probs of the step's pairs (none for sft)
    run.metrics.write(step=clock.steps, tokens=clock.tokens, seconds=round(clock.elapsed(), 3), progress=round(clock.progress(), 5),
                      schedule_progress=round(clock.schedule_progress(), 5), loss=result.loss, lr=run.lr,
                      tokens_per_s=round(tokens_per_s, 1), grad_norm=result.grad_norm,
                      memory_mb=round(peak_memory_bytes(run.device) / 2**20, 1), epoch=round(run.sampler.epoch, 4),
                      **preference)
    bar.update(clock.progress(), clock.steps, result.loss, run.lr, tokens_per_s, clock.training_time_left(), clock.governing(),
               f" acc {preference['reward_accuracy']:.2f}" if preference else "")
    probed = (run.prediction or {}).get("measured_tokens_per_s")
    if probed and not run.warned_busy and len(run.step_rates) >= 5 and statistics.median(run.step_rates[-5:]) * BUSY_FACTOR < probed:
        run.warned_busy = True
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        run.say(f"warning: training runs at {statistics.median(run.step_rates[-5:]):,.0f} tokens/s, less than a third of the "
                f"{probed:,.0f} measured before the run; load average {load:.1f} on {os.cpu_count()} cores — other processes "
                "are probably using the CPU/GPU, and this budget will buy fewer steps")
        run.metrics.write(event="slow", step=clock.steps, tokens_per_s=round(tokens_per_s, 1), probed_tokens_per_s=probed, load=load)


def _periodic(run: Run) -> None:
    """Evals and checkpoints that are due, if the time left can pay for them."""
    clock = run.clock
    p, elapsed = clock.progress(), clock.elapsed()
    time_left = clock.training_time_left()
    spare = math.inf if time_left is None else time_left
    if run.eval_every.due(p, elapsed) and p < 1.0:
        if spare > 2 * run.eval_cost():
            run.say(f"step {clock.steps}: eval loss {run.evaluate():.4f}")
        else:
            run.skipped_evals += 1
            run.metrics.write(event="eval_skipped", step=clock.steps, seconds_left=round(spare, 2), eval_cost_s=round(run.eval_cost(), 2))
            if run.skipped_evals == 1:
                run.say(f"step {clock.steps}: periodic eval skipped: {spare:.1f}s of training time left, an eval costs "
                        f"{run.eval_cost():.1f}s (later ones are skipped quietly; see metrics.jsonl)")
    if run.ckpt_every.due(p, elapsed) and p < 1.0 and spare > 2 * run.checkpointer.cost_s():
        run.checkpoint()


# --- the end ---------------------------------------------------------------------------------------------------


def finish(run: Run) -> dict:
    """Final eval, checkpoint and model — paid for by the reserve — then summary and report."""
    cfg, clock, main = run.cfg, run.clock, run.main
    run.say(f"final eval + save (reserve {clock.reserve_s:.1f}s)")
    loss_after = run.evaluate()
    run.checkpoint(final=True)
    if main:
        _save_final(run.dir, run.method, run.raw_model, run.tokenizer)
    elapsed = clock.elapsed()
    budget_s = clock.budget.time_s
    train_s = sum(run.step_seconds)
    summary = {
        "run_dir": str(run.dir.path),
        "method": cfg.method.name,
        "budget": {k: v for k, v in vars(clock.budget).items() if v is not None},
        "governing_budget": clock.governing(),
        "steps": clock.steps,
        "tokens": clock.tokens,
        "flops": clock.tokens * run.fpt,
        "flops_per_token": run.fpt,
        "started_at": run.started_at,  # wall clock when the budget clock started (after model load)
        "elapsed_s": round(elapsed, 3),
        "overshoot_s": round(elapsed - budget_s, 3) if budget_s is not None else None,
        # share of the time budget spent inside optimizer steps (this attempt's steps, for a resumed run)
        "budget_utilisation": round(train_s / budget_s, 4) if budget_s else None,
        "train_steps_s": round(train_s, 3),
        "evals_skipped": run.skipped_evals,
        "tokens_per_s": round(clock.tokens / max(1e-9, elapsed), 1),
        "train_tokens_per_s_last": round(run.step_rates[-1], 1) if run.step_rates else None,
        "train_tokens_per_s_median": round(statistics.median(run.step_rates), 1) if run.step_rates else None,
        "eval_loss_before": run.loss_before,
        "eval_loss_after": loss_after,
        "objective": cfg.objective.name,
        **({"preference_eval": {k: v for k, v in run.last_eval.items() if k != "eval_loss"}} if run.objective.preference else {}),
        "uniform_loss": math.log(len(run.tokenizer)),
        "final_train_loss": run.last.loss if run.last else math.nan,
        "final_lr": run.lr,
        "parameters": run.total,
        "trainable_parameters": run.trainable,
        "peak_memory_mb": round(peak_memory_bytes(run.device) / 2**20, 1),
        "predicted": run.speed.annotate(run.prediction),  # the planner's numbers for this recipe, each tokens/s labelled
        "recipe": {"method": cfg.method.name, "micro_batch": run.sampler.micro_batch, "grad_accum": run.accum,
                   "gradient_checkpointing": cfg.model.gradient_checkpointing, "lr": cfg.optim.lr,
                   "batch_tokens": step_tokens(run)},
        "epochs": round(run.sampler.epoch, 4),
        "fast_forward_repeats": run.fast_forward.repeats if run.fast_forward else None,
        "bad_steps": run.bad.total,
        "restores": run.bad.restores,
        "world_size": run.world,
        "data": run.data.summary(),
        "environment": environment(run.device),
    }
    run.metrics.close()
    if main:
        _write_json(run.dir.summary, summary)
        if cfg.output.report:
            report([run.dir.path])  # RUN_DIR/report.html (its cost is in the reserve)
        run.say(f"done in {format_duration(elapsed)}"
                + (f" (budget {format_duration(budget_s)}, overshoot {summary['overshoot_s']:+.2f}s, "
                   f"{100 * summary['budget_utilisation']:.0f}% of it in optimizer steps)" if budget_s else "")
                + f": {clock.steps} steps, {format_count(clock.tokens)} tokens, eval loss {run.loss_before:.4f} → {loss_after:.4f}; "
                f"run folder {run.dir.path}")
        if run.objective.preference and run.last_eval:
            e = run.last_eval
            run.say(f"{cfg.objective.name}: held-out reward accuracy {e.get('reward_accuracy', math.nan):.3f}, mean margin "
                    f"{e.get('margin', math.nan):.4f}, log-probs chosen {e.get('chosen_logp', math.nan):.2f} / rejected "
                    f"{e.get('rejected_logp', math.nan):.2f}")
        if run.prediction:
            run.say(f"planner: peak memory {run.prediction['peak_memory_mb']:.0f} MB predicted "
                    f"({run.prediction.get('peak_memory_basis', 'live tensors')}), {summary['peak_memory_mb']:.0f} MB measured (peak RSS); "
                    + run.speed.describe(summary["train_tokens_per_s_median"]))
    if cfg.tracking:
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    return summary


def _save_final(run_dir: RunDir, method, model, tokenizer) -> None:
    """The trained result in Hugging Face format, written beside and renamed into place."""
    tmp = run_dir.path / ".tmp-model"
    if tmp.exists():
        shutil.rmtree(tmp)
    method.save_pretrained(model, tmp)
    tokenizer.save_pretrained(str(tmp))
    if run_dir.model.exists():
        shutil.rmtree(run_dir.model)
    os.replace(tmp, run_dir.model)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
