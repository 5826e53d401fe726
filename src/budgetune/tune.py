"""The budget race: spend a stated share of the budget finding the best recipe for it, then train the winner
(issue 16; METHODS.md §9).

    tune()             the command (`budgetune tune CONFIG`, or `train` with tune.fraction set)
    train_or_race()    `budgetune train` and `budgetune.train`: tune() when tune.fraction is set, else one train.train()
    race_space()       candidates: the planner's recipes that fit × an LR log grid × adapter rank × methods/optimizers,
                       with the keys the user pinned left pinned, shrunk to what the race budget affords
    rung_sizes(), successive_halving()
                       the halving bookkeeping: pure functions (tests drive them with a fake objective)

Every trial is one ordinary `train()` call on a slice of the budget in its own folder RUN/trials/NN-label/: the one
loop, with its checkpoints and resume rules. A trial that survives a rung continues from its own state (`--resume
--extend` onto a larger slice), so a rung costs only the extra slice. How a trial's held-out loss is read
(`tune.mode`):

- cooldown: each slice has the configured schedule as a complete function of the slice's progress, so the LR has
  annealed when the loss is read; a promoted trial's schedule goes on as its slice grows (progress = used ÷ new slice),
  its LR ramped back up from ~0 over schedule.warmup (schedules.rewarmed), not in one jump;
- branch (WSD branching): a trial trains at constant LR (after warmup); its loss is read on a copy that cools the LR
  down linearly over a further BRANCH_SHARE of its tokens, and the trunk, not the cooled copy, continues.

The default is cooldown, by measurement (benchmarks/tune.py --modes, docs/benchmarks.md): on the 2-core CPU a trainer
call costs ~1.5–2 s of set-up and evals beyond its steps, which branching pays twice per reading (trunk, then branch)
plus the branch's tokens; at 300k tokens on the chat task branching could not afford two candidates where cooldown
raced two. Where both race (chat, 1M tokens and 600 s) neither wins on every seed and budget; the one large win of
branch came from its winner going on as WSD, which the plain defaults gain as well (`schedule.name: wsd`).

The winner continues from its trial state into the run folder itself (its checkpoint is copied to RUN/checkpoints
and `train --resume --extend` runs on what is left of the budget): same data order and optimizer state, the LR
re-warmed from its trial's cooldown over schedule.warmup (jumping straight back to the schedule cost 0.31 in held-out
loss at equal tokens; docs/benchmarks.md). From scratch the winner restarts instead (`restarts`): its trial warmed up
over schedule.warmup of a slice of a few dozen steps, one step or two, and a random init that starts that fast stays
behind for good (the defaults with a one-step warmup ended 0.35 higher at 300 s).
Trials use the batch the planner chose for the whole budget, so the continuation is the run the planner would have
started. Tokens the other trials saw are counted in summary.json (`tune`).

Why not Optuna's ask/tell with its SuccessiveHalvingPruner: that pruner is asynchronous (ASHA) — a trial is stopped by
comparing it with the trials that reached the rung before it, so with trials run one after another on one machine the
first trials are never stopped and which trials go on depends on their order; it also reads a loss at pruning points
inside one run, where our loss must be read after a cooldown, and its state would need a storage backend to survive a
kill. Synchronous halving over a fixed candidate list is 20 lines (`successive_halving`) whose state is a JSON file
that resume reads back.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import list_checkpoints
from .config import Config, dump_config, load_config
from .console import console, quiet_libraries, say
from .errors import BudgetuneError, Interrupted
from .rundir import RunDir
from .train import train
from .units import format_count, format_duration, parse_count, parse_duration

STATE = "tune.json"  # the race's state in the run folder: the candidates, every reading, the winner
BRANCH_SHARE = 0.2  # branch mode: the cooldown branch that reads a trial's loss is this share of the trial's tokens
OVERHEAD_FIXED_S = 1.0  # wall-clock of one trial call beyond its optimizer steps and evals (plan, model load, data from
# the cache, checkpoint, save), until the first trial measures the whole overhead: ~1 s for the tiny test Llama on a
# 2-core CPU, whose call took ~1.4 s beyond its steps with two small evals


# --- the halving bookkeeping (pure) ----------------------------------------------------------------------------


def rung_sizes(n: int, eta: int) -> list[int]:
    """Trials run at each rung: n, n // eta, ... while at least two are left to compare (one left is the winner)."""
    sizes, k = [], n
    while k >= 2:
        sizes.append(k)
        k //= eta
    return sizes


def rung_cost(rung: int, eta: int, branch_share: float = 0.0) -> float:
    """What one trial spends at a rung, in units of the first rung's slice: a survivor's slice grows to eta^rung and
    it continues from its state, so it pays only the increment (plus, for WSD branching, its reading branch)."""
    increment = 1.0 if rung == 0 else eta ** (rung - 1) * (eta - 1)
    return increment + branch_share * eta**rung


def race_cost(n: int, eta: int, branch_share: float = 0.0) -> tuple[float, int]:
    """(total cost in first-rung slices, trainer calls) of racing n candidates."""
    sizes = rung_sizes(n, eta)
    calls = sum(sizes) * (2 if branch_share else 1)
    return sum(k * rung_cost(i, eta, branch_share) for i, k in enumerate(sizes)), calls


def _loss_key(loss: float) -> float:
    return loss if loss is not None and math.isfinite(loss) else math.inf  # a diverged trial loses


def successive_halving(ids: list, eta: int, evaluate: Callable[[object, int], float], results: dict | None = None,
                       before_rung: Callable[[int, list], None] | None = None) -> tuple[object, dict]:
    """Synchronous successive halving: every live trial is read at a rung, the best 1/eta go on.

    `evaluate(id, rung)` → held-out loss; `results` {(id, rung): loss} already known (a resumed race: those are
    not evaluated again). Ties go to the earlier candidate. Returns (winner, results)."""
    results = {} if results is None else results
    sizes = rung_sizes(len(ids), eta)
    alive = list(ids)
    for rung, _ in enumerate(sizes):
        if before_rung is not None:
            before_rung(rung, alive)
        for i in alive:
            if (i, rung) not in results:
                results[(i, rung)] = evaluate(i, rung)
        keep = sizes[rung + 1] if rung + 1 < len(sizes) else 1
        alive = sorted(alive, key=lambda i: (_loss_key(results[(i, rung)]), ids.index(i)))[:keep]
    return alive[0], results


# --- the candidate space -------------------------------------------------------------------------------------


@dataclass
class Combo:
    """A method × optimizer that fits, with the recipe the planner gives it for the chosen batch."""

    method: str
    optimizer: str
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    quantize: str | None
    speed_guess: float  # the planner's tokens/s (device guess): only the ratio between combos is used


def _thin(values: list, k: int) -> list:
    """k of the sorted values, spread over them: the ends and the middle for k = 3, the inner quartiles for k = 2."""
    values = sorted(values)
    if k >= len(values):
        return values
    if k == 1:
        return [values[len(values) // 2]]
    lo, hi = (0, len(values) - 1) if k > 2 else (len(values) // 4, len(values) - 1 - len(values) // 4)
    return [values[i] for i in sorted({round(lo + j * (hi - lo) / (k - 1)) for j in range(k)})]


def shrink_space(dims: dict[str, list], n_max: int, count: Callable[[dict], int] | None = None) -> tuple[dict[str, list], list[str]]:
    """Drop what matters least until the space has at most n_max candidates: adapter ranks first, then other methods
    and optimizers (the planner's choice stays), then LR points — LR matters most (METHODS.md §9), so a tiny budget
    races LR only. `dims`: {"ranks", "combos", "lr"}, each list with its default first. Returns (dims, what was cut)."""
    dims = {k: list(v) for k, v in dims.items()}
    cut: list[str] = []

    def size() -> int:
        return count(dims) if count else len(dims["ranks"]) * len(dims["combos"]) * len(dims["lr"])

    if size() > n_max and len(dims["ranks"]) > 1:
        dims["ranks"] = dims["ranks"][:1]
        cut.append(f"adapter rank left at {dims['ranks'][0]}")
    if size() > n_max and len(dims["combos"]) > 1:
        dims["combos"] = dims["combos"][:1]
        cut.append("method and optimizer left at the planner's choice")
    grid = dims["lr"]
    n_lr = len(grid)
    while size() > n_max and len(dims["lr"]) > 2:
        dims["lr"] = _thin(grid, 3 if len(dims["lr"]) > 3 else 2)  # always from the whole grid: 5 → 3 → 2 points
    if len(dims["lr"]) < n_lr:
        cut.append(f"LR grid thinned from {n_lr} to {len(dims['lr'])} points")
    return dims, cut


# --- the command ---------------------------------------------------------------------------------------------


class _Clock:
    """The whole command's wall-clock, across resumes (what a kill lost is not counted, as in train)."""

    def __init__(self, spent: float = 0.0):
        self.spent, self.t0 = spent, time.monotonic()

    def elapsed(self) -> float:
        return self.spent + time.monotonic() - self.t0


DEFAULT_FRACTION = 0.15  # the race's share of the budget when `budgetune tune` runs without tune.fraction


def race_fraction(cfg: Config) -> float:
    """The share of the budget the race spends."""
    return DEFAULT_FRACTION if cfg.tune.fraction is None else cfg.tune.fraction


def restarts(cfg: Config) -> bool:
    """Whether the race's winner trains afresh instead of continuing its trial: from scratch, with a warmup. A trial
    warms up over schedule.warmup of its own slice — a step or two — and a random init trained that way stays behind a
    run warmed up over the same share of the whole budget, re-warmed or not (pre-training at 300 s: the defaults with a
    one-step warmup ended 0.35 above the defaults; docs/benchmarks.md). A pretrained model continues."""
    return cfg.model.init == "scratch" and cfg.schedule.warmup > 0


def claims(cfg: Config, extend: bool) -> bool:
    """`train` races first when tune.fraction is set (an --extend of a finished run trains it further instead).
    Set, not merely present: a run's saved config.yaml lists every key, and retraining from it must not race."""
    return cfg.tune.fraction is not None and not extend


def train_or_race(config=None, overrides=None, *, resume: bool = False, extend: bool = False, overwrite: bool = False,
                  quiet: bool = False) -> dict:
    """`budgetune train` and `budgetune.train`: the race first when tune.fraction is set (`claims`), else one run
    (train.train). Here, above train.py, so that the loop never imports the race that calls it."""
    cfg = load_config(config, overrides)
    if claims(cfg, extend):
        return tune(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    return train(cfg, resume=resume, extend=extend, overwrite=overwrite, quiet=quiet)


def tune(config=None, overrides=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Race candidate recipes on tune.fraction of the budget, then train the winner on the rest in output.dir.
    Returns the run summary (summary.json), with the race under `tune`."""
    cfg = load_config(config, overrides)
    quiet_libraries()
    run_dir = RunDir(Path(cfg.output.dir))
    state_path = run_dir.path / STATE
    overwrite = overwrite or cfg.output.overwrite
    if resume and not state_path.exists() and run_dir.config.exists():  # a race that found nothing to race left an ordinary run
        return train(_without_tune(cfg), resume=True, quiet=quiet)
    if resume and not state_path.exists():
        if run_dir.path.exists() and run_dir.is_run() and not run_dir.config.exists():
            resume, overwrite = False, True  # killed before the race was planned: start it again
        else:
            raise BudgetuneError(f"--resume: {run_dir.path} holds no race to resume; start it without --resume")
    if not resume:
        run_dir.check(False, overwrite)
        if run_dir.path.exists():
            run_dir.check_unlocked()
    state = json.loads(state_path.read_text()) if resume else None
    if state is not None and state["phase"] == "done":
        raise BudgetuneError(f"{run_dir.path} holds a finished race and its winner; to train the winner further, raise the "
                             "budget and use `budgetune train ... --resume --extend`, or start again with --overwrite")
    clock = _Clock(state["elapsed_s"] if state else 0.0)
    log = (lambda m: say(m)) if not quiet else (lambda m: None)
    previous = run_dir.prepare(resume, overwrite)
    lock = run_dir.lock_and_sign()
    race = Race(cfg, run_dir, clock, log, quiet)
    try:
        if state is None:
            state = race.plan()
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            previous = None
        race.state = state
        if state["phase"] == "no_race":
            lock.close()
            lock = None
            return race.train_without_race()
        if state["phase"] == "race":
            race.run()
        lock.close()
        lock = None
        return race.train_winner()
    except Interrupted as e:
        raise Interrupted(f"{e}".split("; continue with")[0] + f"; continue the race with `budgetune tune ... --resume`",
                          e.exit_code - 128) from None
    except BudgetuneError:
        if state is None:  # bad config or data found while planning: leave nothing behind
            run_dir.discard(previous)
        raise
    finally:
        if lock is not None:
            lock.close()


class Race:
    def __init__(self, cfg: Config, run_dir: RunDir, clock: _Clock, log, quiet: bool):
        self.cfg, self.dir, self.clock, self.log, self.quiet = cfg, run_dir, clock, log, quiet
        self.state: dict = {}

    # --- planning --------------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """Candidates, slices and the state file; the planner's batch (one timed step) is the whole run's."""
        from .plan.batch import method_lr_scale
        from .plan.search import make_plan, plan_for_training, step_tokens as tokens_in

        from .data import prepare_data
        from .models import load_tokenizer

        cfg, log = self.cfg, self.log
        # the tokenizer (trained and cached when asked) and the data read and tokenised once, before anything is
        # replaced: bad data is one clear error here with a previous run untouched, and every trial reads the cache.
        # Selection scores with a model, per trial; reading the data does not need it
        readable = copy.deepcopy(cfg)
        readable.data.select.method = "off"
        prepare_data(readable, load_tokenizer(cfg, log=log), seed=cfg.train.seed, log=lambda m: None)
        planned, prediction = plan_for_training(cfg, log=log)
        if prediction is None:
            raise BudgetuneError("tune: the planner could not model this recipe (see above), and the race needs its "
                                 "prediction of speed to slice the budget; train it with `budgetune train` instead")
        rows = planned.train.micro_batch * planned.train.grad_accum
        step_tokens = tokens_in(rows, prediction, cfg.data.seq_len)  # unpacked rows: their real tokens
        base_speed = prediction.get("measured_tokens_per_s") or prediction["tokens_per_s"]
        pinned = cfg.explicit
        space = cfg.tune.space
        notes = []

        # methods × optimizers that fit, each with the planner's recipe for this batch
        methods = [cfg.method.name] if "method.name" in pinned else (space.methods or ["full", "lora"])
        optimizers = [cfg.optim.name] if "optim.name" in pinned else (space.optimizers or [cfg.optim.name])
        if "method.name" in pinned and space.methods and space.methods != [cfg.method.name]:
            notes.append(f"method.name is pinned to {cfg.method.name}: tune.space.methods is not raced")
        if "optim.name" in pinned and space.optimizers and space.optimizers != [cfg.optim.name]:
            notes.append(f"optim.name is pinned to {cfg.optim.name}: tune.space.optimizers is not raced")
        first = (planned.method.name, planned.optim.name)  # the planner's choice: its speed was measured
        pairs = [(m, o) for m in methods for o in optimizers]
        pairs.sort(key=lambda pair: pair != first)  # the planner's choice first: it is what a shrunk space keeps
        combos, guesses = [], {}
        for m, o in ([first] if first not in pairs else []) + pairs:
            p = make_plan(self._config_for(m, o, step_tokens), probe_steps=0, log=lambda _: None, measure_batch_speed=False)
            if p.best is None:
                notes.append(f"{m} with {o} does not fit: {p.candidates[0].why_not if p.candidates else 'no recipe'}")
                continue
            guesses[(m, o)] = p.best.tokens_per_s
            r = p.best.recipe
            if (m, o) in pairs:
                combos.append(Combo(m, o, r.micro_batch, r.grad_accum, r.gradient_checkpointing, r.quantize, p.best.tokens_per_s))
        if not combos:
            raise BudgetuneError("tune: no method and optimizer of the race's space fits the memory budget (see "
                                 "`budgetune plan`); widen tune.space.methods or raise budget.memory")
        base_guess = guesses.get(first) or combos[0].speed_guess

        lr0 = planned.optim.lr  # the planned method's LR; the grid is centred on each method's own (plan/batch.py)
        base_lr = lr0 / method_lr_scale(planned.method.name)  # full fine-tuning's: each method scales it by its own factor
        lr_factors = [1.0] if "optim.lr" in pinned else sorted(space.lr, key=lambda f: (abs(math.log(f)), f))
        any_adapter = any(_has_rank(c.method) for c in combos)
        default_r = cfg.method.r if hasattr(cfg.method, "r") else 16
        ranks = [default_r] if ("method.r" in pinned or not any_adapter) else \
            sorted(set(space.ranks), key=lambda r: (r != default_r, r))
        dims = {"ranks": ranks, "combos": combos, "lr": lr_factors}

        # how many candidates the race budget affords
        budget = self._budget_units(step_tokens, base_speed, prediction)
        unit, race_total = budget["unit"], budget["race"]
        # a trial call's set-up and its two evals (before and after; a forward pass costs ~1/3 of a training step)
        eval_tokens = min(cfg.eval.max_tokens, cfg.tune.eval_tokens)
        overhead = OVERHEAD_FIXED_S + 2 * eval_tokens / (3 * base_speed) if unit == "seconds" else 0.0
        min_slice = self.cfg.tune.min_steps * (step_tokens / base_speed if unit == "seconds" else step_tokens)
        share = BRANCH_SHARE if cfg.tune.mode == "branch" else 0.0
        available = race_total - self.clock.elapsed() if unit == "seconds" else race_total

        def affords(n: int) -> bool:
            cost, calls = race_cost(n, cfg.tune.eta, share)
            return n >= 2 and (available - overhead * calls) / cost >= min_slice

        def count(d: dict) -> int:  # ranks multiply only the adapter methods that have one
            return sum(len(d["ranks"]) if _has_rank(c.method) else 1 for c in d["combos"]) * len(d["lr"])

        full_n = count(dims)
        n_max = max([n for n in range(2, max(3, full_n) + 1) if affords(n)], default=1)
        dims, steps = shrink_space(dims, n_max, count)
        n = count(dims)
        if n > n_max:  # even two LR points are too many
            dims["lr"] = dims["lr"][:1] if n_max < 2 else dims["lr"]
            n = count(dims)
        race_text = (f"{format_duration(race_total)} of {format_duration(budget['total'])}" if unit == "seconds"
                     else f"{format_count(race_total)} of {format_count(budget['total'])} tokens")
        slice_text = (f"≥ {cfg.tune.min_steps} steps (~{format_duration(min_slice)}) each at the first rung, "
                      f"plus ~{overhead:.1f}s per trial for its set-up and evals" if unit == "seconds"
                      else f"≥ {cfg.tune.min_steps} steps ({format_count(min_slice)} tokens) each at the first rung")
        log(f"race budget: {race_text} ({race_fraction(cfg):.0%}) affords {n_max if n_max >= 2 else 'fewer than 2'} "
            f"candidates of {slice_text}; the space has {full_n} ({_describe(ranks, combos, lr_factors)})")
        for note in notes:
            log(f"  {note}")
        if n >= 2 and n < full_n:
            log(f"  the space is too large for this budget: racing {n} ({', '.join(steps)})")

        # the candidates
        trials = []
        if n >= 2:
            for combo in dims["combos"]:
                for r in (dims["ranks"] if _has_rank(combo.method) else [None]):
                    for f in sorted(dims["lr"]):
                        lr = lr0 if "optim.lr" in pinned else base_lr * f * method_lr_scale(combo.method)
                        trials.append(self._trial(len(trials), combo, r, lr, base_speed * combo.speed_guess / base_guess))
        state = {"version": 1, "phase": "race" if len(trials) >= 2 else "no_race", "unit": unit, "budget": budget,
                 "fraction": race_fraction(cfg), "eta": cfg.tune.eta, "mode": cfg.tune.mode, "overhead_s": overhead,
                 "step_tokens": step_tokens, "lr_centre": lr0, "space_size": full_n, "affordable": n_max,
                 "shrunk": steps, "notes": notes, "trials": trials, "elapsed_s": self.clock.elapsed(), "calls": []}
        if full_n < 2:
            log("  nothing to race: the config pins every key the race varies (optim.lr, method.name, method.r, optim.name); "
                "training it on the whole budget")
        elif len(trials) < 2:
            log("  the race budget cannot afford two candidates: training the planner's recipe on the whole budget "
                "(raise the budget or tune.fraction, or lower tune.min_steps)")
        self.state = state
        self._save()
        return state

    def _config_for(self, method: str, optimizer: str, batch_tokens: int | None = None) -> Config:
        d = self.cfg.to_dict()
        d.pop("tune")
        d["method"] = dict(d["method"]) if method == self.cfg.method.name else {"name": method}
        d["optim"]["name"] = optimizer
        if batch_tokens is not None:
            d["train"]["batch_tokens"] = batch_tokens
        cfg = load_config(d)
        object.__setattr__(cfg, "_explicit", self.cfg.explicit | {"method.name", "optim.name", "train.batch_tokens"})
        return cfg

    def _budget_units(self, step_tokens: int, speed: float, prediction: dict) -> dict:
        """The race's currency: seconds for a time budget (trials get the tokens their speed buys in them),
        tokens otherwise (steps and FLOPs budgets are converted: a FLOPs budget at the planned recipe's
        FLOPs per token, so every trial's token counts as one of that recipe's)."""
        b = self.cfg.budget
        if b.time is not None:
            total = parse_duration(b.time)
            return {"unit": "seconds", "total": total, "race": race_fraction(self.cfg) * total, "time_s": total}
        options = []
        if b.tokens is not None:
            options.append(parse_count(b.tokens))
        if b.steps is not None:
            options.append(b.steps * step_tokens)
        flops_per_token = prediction["flops_per_token"]
        if b.flops is not None:
            options.append(parse_count(b.flops) / flops_per_token)
        total = min(options)
        return {"unit": "tokens", "total": total, "race": race_fraction(self.cfg) * total, "flops_per_token": flops_per_token}

    def _trial(self, i: int, combo: Combo, r: int | None, lr: float, speed: float) -> dict:
        label = combo.method + (f"-r{r}" if r is not None else "") + (f"-{combo.optimizer}" if combo.optimizer != self.cfg.optim.name else "") + f"-lr{lr:.2g}"
        method = {"name": combo.method} | ({"r": r} if r is not None else {})
        if combo.method == self.cfg.method.name:
            method = dict(self.cfg.to_dict()["method"]) | method
        overrides = {"method": method, "optim": {"name": combo.optimizer, "lr": lr},
                     "train": {"micro_batch": combo.micro_batch, "grad_accum": combo.grad_accum, "batch_tokens": None},
                     "model": {"gradient_checkpointing": combo.gradient_checkpointing, "quantize": combo.quantize}}
        return {"id": i, "label": label, "dir": f"trials/{i:02d}-{label}", "method": combo.method, "optimizer": combo.optimizer,
                "rank": r, "lr": lr, "speed": speed, "overrides": overrides, "rungs": [], "state": "racing", "stopped_at": None,
                "wall_s": 0.0, "tokens": 0, "race_tokens": 0}

    # --- racing ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        st = self.state
        trials = st["trials"]
        ids = [t["id"] for t in trials]
        results = {(t["id"], rung["rung"]): rung["loss"] for t in trials for rung in t["rungs"]}
        sizes = rung_sizes(len(ids), st["eta"])
        share = BRANCH_SHARE if st["mode"] == "branch" else 0.0
        increments: dict[int, float] = {}

        def before_rung(rung: int, alive: list) -> None:
            # the slice is re-planned from what is left of the race budget: a slow machine or a costly set-up
            # makes later slices shorter instead of breaking the time promise
            left = st["budget"]["race"] - (self.clock.elapsed() if st["unit"] == "seconds" else self._race_tokens())
            weights = sum(k * rung_cost(i, st["eta"], share) for i, k in enumerate(sizes) if i >= rung)
            calls = sum(sizes[rung:]) * (2 if share else 1)
            r0 = max(0.0, left - st["overhead_s"] * calls) / weights
            increments[rung] = r0 * rung_cost(rung, st["eta"], 0.0)
            self.log(f"rung {rung + 1}/{len(sizes)}: {len(alive)} trials, "
                     + (f"+{format_duration(increments[rung])} each" if st["unit"] == "seconds"
                        else f"+{format_count(increments[rung])} tokens each")
                     + (f" (each read on a {BRANCH_SHARE:.0%} cooldown branch)" if share else ""))

        def evaluate(i: int, rung: int) -> float:
            t = trials[i]
            add = increments[rung] * (t["speed"] if st["unit"] == "seconds" else 1.0)
            target = int(max(t["tokens"] + st["step_tokens"], t["tokens"] + add))
            loss = self._read(t, rung, target)
            return loss

        winner, results = successive_halving(ids, st["eta"], evaluate, results, before_rung)
        last = {}
        for t in trials:
            last[t["id"]] = len(t["rungs"]) - 1
        for t in trials:
            t["state"] = "winner" if t["id"] == winner else "stopped"
            t["stopped_at"] = None if t["id"] == winner else last[t["id"]]
        ranked = sorted((t for t in trials if last[t["id"]] == last[winner]), key=lambda t: _loss_key(t["rungs"][-1]["loss"]))
        w = trials[winner]
        runner = next((t for t in ranked if t["id"] != winner), None)
        st["winner"] = winner
        st["why"] = (f"lowest held-out loss at rung {last[winner] + 1} ({w['rungs'][-1]['loss']:.4f}"
                     + (f" vs {runner['rungs'][-1]['loss']:.4f} for {runner['label']}" if runner else "") + ")")
        st["race_s"] = self.clock.elapsed()
        st["race_tokens"] = self._race_tokens()
        st["phase"] = "winner"
        self._save()
        self._print_table()
        for t in trials:  # stopped trials keep their metrics and summary, not their weights
            if t["id"] != winner:
                for sub in ("checkpoints", "model", "base"):
                    shutil.rmtree(self.dir.path / t["dir"] / sub, ignore_errors=True)

    def _race_tokens(self) -> float:
        return sum(t["race_tokens"] for t in self.state["trials"])

    def _read(self, t: dict, rung: int, target: int) -> float:
        """Train trial t up to `target` tokens and read its held-out loss (after a cooldown branch in branch mode)."""
        st = self.state
        trunk = self.dir.path / t["dir"]
        branch = st["mode"] == "branch"
        schedule = {"name": "constant"} if branch else {}
        summary, wall, load = self._call(t, trunk, target, schedule)
        t["race_tokens"] += summary["tokens"] - t["tokens"]
        t["tokens"], t["wall_s"] = summary["tokens"], t["wall_s"] + wall
        reading = summary
        if branch:
            copy_dir = trunk.with_name(trunk.name + f"-branch{rung}")
            shutil.rmtree(copy_dir, ignore_errors=True)
            shutil.copytree(trunk, copy_dir, ignore=shutil.ignore_patterns(".budgetune-lock", "model", "base", "summary.json"))
            cool = int(BRANCH_SHARE * summary["tokens"]) + st["step_tokens"]
            decay = cool / (summary["tokens"] + cool)
            reading, bwall, _ = self._call(t, copy_dir, summary["tokens"] + cool, {"name": "wsd", "decay": decay}, resume=True)
            t["race_tokens"] += reading["tokens"] - summary["tokens"]
            t["wall_s"] += bwall
            wall += bwall
            shutil.rmtree(copy_dir, ignore_errors=True)
        if summary.get("train_tokens_per_s_median") and st["unit"] == "seconds":
            # measured speed: this trial's, and that of the trials of the same recipe not yet run (LR does not change it)
            for other in st["trials"]:
                if other is t or (not other["rungs"] and (other["method"], other["optimizer"], other["rank"]) ==
                                  (t["method"], t["optimizer"], t["rank"])):
                    other["speed"] = summary["train_tokens_per_s_median"]
        loss = reading["eval_loss_after"]
        t["rungs"].append({"rung": rung, "tokens": t["tokens"], "steps": summary["steps"], "wall_s": round(t["wall_s"], 2),
                           "loss": loss, "train_steps_s": summary["train_steps_s"]})
        if wall > 0:  # (0: a call that had finished before a kill, read back)
            st["calls"].append({"wall_s": round(wall, 3), "load_s": round(load, 3),
                                "train_steps_s": summary["train_steps_s"] + (reading["train_steps_s"] if branch else 0.0)})
        if st["unit"] == "seconds" and st["calls"]:  # what a call costs beyond its steps, measured
            st["overhead_s"] = statistics.median(c["wall_s"] - c["train_steps_s"] for c in st["calls"]) / (2 if branch else 1)
        st["elapsed_s"] = self.clock.elapsed()
        self._save()
        self.log(f"  trial {t['id'] + 1:>2} {t['label']:<28} {format_count(t['tokens']):>6} tokens  {summary['steps']:>4} steps  "
                 f"held-out loss {loss:.4f}  ({wall:.1f}s)")
        return loss

    def _call(self, t: dict, folder: Path, target: int, schedule: dict, resume: bool | None = None) -> tuple[dict, float, float]:
        """One train() call: trial t's folder trained up to `target` tokens. Idempotent: a call that finished before a
        kill is read back, one that was killed resumes."""
        d = self._base_dict()
        _merge(d, copy.deepcopy(t["overrides"]))
        d["schedule"].update(schedule)
        d["budget"] = {"tokens": target}
        d["eval"].update({"every": None, "max_tokens": min(self.cfg.eval.max_tokens, self.cfg.tune.eval_tokens), "prompts": []})
        d["checkpoint"].update({"every": None, "keep": 1, "background": False})
        d["output"] = {"dir": str(folder), "overwrite": False, "report": False}
        summary_path = folder / "summary.json"
        if summary_path.exists():
            done = json.loads(summary_path.read_text())
            if done.get("budget", {}).get("tokens") == target:
                return done, 0.0, 0.0
        if resume is None:  # a folder of ours that a kill left: train() resumes it (or starts it afresh if it has no checkpoint)
            resume = (folder / ".budgetune-run").exists()
        extend = resume and (summary_path.exists() or bool(list_checkpoints(folder / "checkpoints")))
        called = time.time()
        summary = train(d, resume=resume, extend=extend, quiet=True)
        return summary, time.time() - called, summary["started_at"] - called

    def _base_dict(self) -> dict:
        d = self.cfg.to_dict()
        d.pop("tune")
        return d

    def _save(self) -> None:
        path = self.dir.path / STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, path)

    def _print_table(self) -> None:
        if self.quiet:
            return
        from rich import box
        from rich.table import Table

        st = self.state
        n_rungs = max(len(t["rungs"]) for t in st["trials"])
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="the race", title_justify="left")
        for col in ("#", "recipe", "lr", "spent", "tokens", *[f"rung {i + 1}" for i in range(n_rungs)], ""):
            table.add_column(col, justify="left" if col in ("recipe", "") else "right", no_wrap=True)
        for t in st["trials"]:
            losses = [f"{r['loss']:.4f}" for r in t["rungs"]] + ["—"] * (n_rungs - len(t["rungs"]))
            verdict = "[bold green]winner[/]" if t["state"] == "winner" else f"stopped at rung {t['stopped_at'] + 1}"
            table.add_row(str(t["id"] + 1), _recipe_text(t), f"{t['lr']:.2e}", format_duration(t["wall_s"]),
                          format_count(t["tokens"]), *losses, verdict)
        console.print(table)
        budget = st["budget"]
        spent = st["race_s"] if st["unit"] == "seconds" else st["race_tokens"]
        self.log(f"winner: {_recipe_text(st['trials'][st['winner']])} at LR {st['trials'][st['winner']]['lr']:.3g} — {st['why']}; "
                 f"the race cost {100 * spent / budget['total']:.1f}% of the budget")

    # --- the winner --------------------------------------------------------------------------------------------
    def train_winner(self) -> dict:
        """The winner continues from its trial state in the run folder, on what is left of the budget — or, from
        scratch, starts afresh there (`restarts`)."""
        st = self.state
        w = st["trials"][st["winner"]]
        if "winner_config" not in st:
            source = self.dir.path / w["dir"]
            last = list_checkpoints(source / "checkpoints")[-1]
            restart = restarts(self.cfg)
            lineage = {"elapsed_s": 0.0, "tokens": 0, "steps": 0} if restart else json.loads((last / "state.json").read_text())["clock"]
            d = self._base_dict()
            _merge(d, copy.deepcopy(w["overrides"]))
            if st["mode"] == "branch" and "schedule.name" not in self.cfg.explicit:
                d["schedule"]["name"] = "wsd"  # the trunk's stable phase goes on, then the configured decay
            d["output"]["overwrite"] = False
            budget = dict(d["budget"])
            if st["unit"] == "seconds":
                loads = [c["load_s"] for c in st["calls"] if c["load_s"] > 0] or [0.0]
                left = st["budget"]["time_s"] - self.clock.elapsed() - statistics.median(loads)
                # (a race that overran on a machine far slower than planned still lets the winner finish its last step)
                budget["time"] = round(lineage["elapsed_s"] + max(2.0, left), 3)
            own = {"tokens": lineage["tokens"], "steps": lineage["steps"]}
            # what the other trials (and branches) consumed; a restarted winner's own trial is spent as well
            race_tokens = st["race_tokens"] - (0 if restart else w["race_tokens"])
            if budget.get("tokens") is not None:
                budget["tokens"] = int(own["tokens"] + parse_count(budget["tokens"]) - st["race_tokens"])
            if budget.get("steps") is not None:
                budget["steps"] = int(own["steps"] + budget["steps"] - round(st["race_tokens"] / st["step_tokens"]))
            if budget.get("flops") is not None:  # the other trials' tokens at the rate the race converted them
                budget["flops"] = parse_count(budget["flops"]) - race_tokens * st["budget"]["flops_per_token"]
            d["budget"] = budget
            st["winner_config"] = d
            st["lineage_elapsed_s"] = lineage["elapsed_s"]  # the winner's clock when it left the race (its trial's time)
            st["other_trials_tokens"] = race_tokens
            st["restarted"] = restart
            left_text = (f"{format_duration(max(0.0, budget['time'] - lineage['elapsed_s']))} left of the budget"
                         if st["unit"] == "seconds" else "what is left of the budget")
            if (source / "base").exists() and not self.dir.base.exists():  # an adapter's random-init base (scratch): the
                shutil.copytree(source / "base", self.dir.base)                # same seeded init, whether it goes on or not
            if not restart:  # (restarted, train() finds no checkpoint in the run folder and starts afresh)
                (self.dir.checkpoints).mkdir(parents=True, exist_ok=True)
                target = self.dir.checkpoints / last.name
                if not target.exists():  # copied aside, then renamed: a kill leaves the whole checkpoint or none
                    tmp = self.dir.checkpoints / f".tmp-{last.name}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(last, tmp)
                    os.replace(tmp, target)
                shutil.copyfile(source / "metrics.jsonl", self.dir.metrics)
                dump_config(load_config(d), self.dir.config)
            self._save()
            self.log(f"training the winner afresh on {left_text}: from scratch its trial warmed up over "
                     f"{self.cfg.schedule.warmup:.0%} of its own slice, and a random init stays behind after so short a "
                     "warmup (docs/benchmarks.md)" if restart else
                     f"training the winner: continuing {w['dir']} from its step {lineage['steps']} "
                     f"({format_count(lineage['tokens'])} tokens, same data order and optimizer state) on {left_text}")
        if self.dir.summary.exists():  # the winner finished before a kill: only the race's part of the summary is missing
            summary = json.loads(self.dir.summary.read_text())
        else:
            summary = train(st["winner_config"], resume=True, extend=True, quiet=self.quiet)
        return self._finish(summary)

    def train_without_race(self) -> dict:
        """Nothing to race (everything pinned, or a budget too small for two trials): the config as `train` runs it."""
        from .plan.search import batch_is_open

        cfg, st = _without_tune(self.cfg), self.state
        overrides = {}
        if batch_is_open(cfg):  # the race's planning chose the batch (and a scratch LR) from a timed step: not twice
            overrides["train"] = {"batch_tokens": st["step_tokens"]}
            if "optim.lr" not in cfg.explicit:
                overrides["optim"] = {"lr": st["lr_centre"]}
        if st["unit"] == "seconds":  # the planning above was paid from the budget
            left = st["budget"]["time_s"] - self.clock.elapsed()
            if left <= 1.0:
                raise BudgetuneError(f"tune: planning took {self.clock.elapsed():.1f}s of budget.time {st['budget']['time_s']:.0f}s, "
                                     "leaving nothing to train; raise budget.time")
            overrides["budget"] = {"time": round(left, 3)}
        if overrides:
            cfg = load_config(cfg, overrides)
        summary = train(cfg, quiet=self.quiet, overwrite=True)  # the folder held only the race's state file
        st["phase"], st["elapsed_s"] = "done", self.clock.elapsed()
        summary["tune"] = {"mode": st["mode"], "candidates": 0, "space_size": st["space_size"], "affordable": st["affordable"],
                           "winner": None, "why": "no race: " + ("the config pins every key the race varies" if st["space_size"] < 2
                                                                 else "the race budget cannot afford two candidates"),
                           "race_share": 0.0, "command_elapsed_s": round(st["elapsed_s"], 3)}
        self._save()  # the state file again (train replaced the folder), and the summary with what happened
        self.dir.summary.write_text(json.dumps(summary, indent=2))
        return summary

    def _finish(self, summary: dict) -> dict:
        """summary.json gains the race: its table, the winner and why, its share of the budget, all tokens trained."""
        st = self.state
        elapsed = self.clock.elapsed()
        spent = st["race_s"] if st["unit"] == "seconds" else st["race_tokens"]
        summary["tune"] = {
            "mode": st["mode"], "eta": st["eta"], "fraction": st["fraction"], "unit": st["unit"],
            "candidates": len(st["trials"]), "space_size": st["space_size"], "affordable": st["affordable"], "shrunk": st["shrunk"],
            "winner": st["trials"][st["winner"]]["label"], "why": st["why"],
            "race_spent": spent, "race_share": round(spent / st["budget"]["total"], 4),
            "race_tokens": st["race_tokens"], "other_trials_tokens": st["other_trials_tokens"],
            "winner_restarted": st.get("restarted", False),
            "tokens_including_race": summary["tokens"] + st["other_trials_tokens"],
            "command_elapsed_s": round(elapsed, 3),
            "command_overshoot_s": round(elapsed - st["budget"]["time_s"], 3) if st["unit"] == "seconds" else None,
            "trials": [{k: t[k] for k in ("id", "label", "method", "optimizer", "rank", "lr", "tokens", "wall_s", "rungs",
                                          "state", "stopped_at")} for t in st["trials"]],
        }
        path = self.dir.summary
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
        st["phase"] = "done"
        st["elapsed_s"] = elapsed
        self._save()
        if st["unit"] == "seconds":
            self.log(f"tune done in {format_duration(elapsed)} (budget {format_duration(st['budget']['time_s'])}, "
                     f"overshoot {elapsed - st['budget']['time_s']:+.2f}s); the race cost {100 * summary['tune']['race_share']:.1f}% "
                     f"of it and trained {format_count(st['race_tokens'])} tokens")
        return summary


# --- small helpers -------------------------------------------------------------------------------------------


def _without_tune(cfg: Config) -> Config:
    """The config a trial or the final run trains: no tune section, so `train` does not race again."""
    d = cfg.to_dict()
    d.pop("tune")
    out = load_config(d)
    object.__setattr__(out, "_explicit", frozenset(k for k in cfg.explicit if not k.startswith("tune")))
    return out


def _merge(d: dict, extra: dict) -> None:
    for key, value in extra.items():
        if key == "method":
            d[key] = value
        elif isinstance(value, dict) and isinstance(d.get(key), dict):
            _merge(d[key], value)
        else:
            d[key] = value


def _has_rank(method: str) -> bool:
    """An adapter method with a rank option `r` (lora and its kin): the race may vary it."""
    import dataclasses

    from .methods import METHODS

    return METHODS[method].adapter and "r" in {f.name for f in dataclasses.fields(METHODS[method].Options)}


def _recipe_text(t: dict) -> str:
    return t["method"] + (f" r{t['rank']}" if t.get("rank") else "") + (f" {t['optimizer']}" if t["optimizer"] != "adamw" else "")


def _describe(ranks: list, combos: list[Combo], lr: list) -> str:
    """'5 LRs × (full + lora × 3 ranks)'."""
    names = [c.method + ("" if c.optimizer == "adamw" else f"+{c.optimizer}")
             + (f" × {len(ranks)} ranks" if _has_rank(c.method) and len(ranks) > 1 else "") for c in combos]
    return f"{len(lr)} LR{'s' if len(lr) > 1 else ''} × ({' + '.join(names)})"
