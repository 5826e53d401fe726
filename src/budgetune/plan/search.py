"""Recipe search: enumerate what the config leaves open, drop what does not fit, rank the rest.

The dimensions are method (full / LoRA), a quantised base (QLoRA: nf4, for adapter methods
that run on one, unless `model.quantize` is set), micro-batch × accumulation (the tokens per
optimizer step stay as configured), and gradient checkpointing; precision follows the
device (fp32 on CPU, bf16 autocast on GPUs). Anything the user set in the config or on
the command line is pinned. Ranking: full fine-tuning before LoRA when both fit and the
method is open (it trains every weight), an unquantised base before a quantised one (QLoRA
is chosen only when nothing unquantised fits), then predicted tokens/s — calibrated by a short
probe on the real device when `plan.probe` is on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..optim import updates_in_backward
from ..units import format_bytes, format_count, parse_bytes, parse_count, parse_duration
from ..budget import Budget
from ..data.sources import estimate_unique_tokens
from .batch import BatchChoice, choose_batch, method_lr_scale, rows_from_batch_tokens
from .memory import MemoryEstimate, allocator_basis, estimate_memory, with_allocator
from .recipe import Recipe, prepare_method
from .scaling import ScratchProposal, propose_scratch
from .flops import matmul_parameters
from .throughput import device_flops_guess, probe, reference_pass_factor, step_flops_per_token



@dataclass
class Candidate:
    recipe: Recipe
    memory: MemoryEstimate
    trainable: int
    flops_per_token: float
    tokens_per_s: float
    fits: bool = True
    why_not: str = ""
    probed: bool = False
    tokens_in_budget: float | None = None
    epochs: float | None = None

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "fits": self.fits,
            "why_not": self.why_not,
            "peak_memory_bytes": self.memory.total,
            "memory_terms": self.memory.terms,
            "trainable_parameters": self.trainable,
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": self.tokens_per_s,
            "probed": self.probed,
            "tokens_in_budget": self.tokens_in_budget,
            "epochs": self.epochs,
        }


@dataclass
class Plan:
    device: str
    memory_budget: int
    candidates: list[Candidate]
    unique_tokens: float | None
    scratch: ScratchProposal | None = None
    notes: list[str] = field(default_factory=list)
    batch: BatchChoice | None = None  # tokens per step chosen for the budget (None: pinned, or a step budget)
    measured_tokens_per_s: float | None = None  # forward+backward speed timed before choosing the batch
    tokens_per_row: float | None = None  # real tokens per row the probe counted (unpacked rows: the data's mean)

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "memory_budget_bytes": self.memory_budget,
            "unique_tokens_estimate": self.unique_tokens,
            "best": self.best.to_dict() if self.best else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "scratch": vars(self.scratch) if self.scratch else None,
            "batch": vars(self.batch) if self.batch else None,
            "notes": self.notes,
        }


class _VocabOnly:
    """Stands in for a tokenizer when only the vocabulary size matters (planning from a config)."""

    def __init__(self, size: int):
        self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, None, 0, 0

    def __len__(self) -> int:
        return self.size


def plan_model_config(cfg):
    """The transformers config to plan for, without loading weights (or training a tokenizer)."""
    from ..models import load_tokenizer, model_config

    if cfg.model.init == "pretrained":
        return model_config(cfg, None)
    if cfg.tokenizer.train_vocab_size > 0:
        return model_config(cfg, _VocabOnly(cfg.tokenizer.train_vocab_size))
    return model_config(cfg, load_tokenizer(cfg, log=lambda m: None))


def parameter_counts(config, recipe: Recipe) -> tuple[int, int, int]:
    """(total, matmul, trainable-matmul) parameters for a method, counted on a meta-device model."""
    from transformers import AutoModelForCausalLM

    from .flops import matmul_parameters

    with torch.device("meta"):
        model = prepare_method(AutoModelForCausalLM.from_config(config), recipe)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_matmul, n_trainable = matmul_parameters(model)
    return total, n_matmul, n_trainable


def target_device(cfg) -> torch.device:
    if cfg.plan.device != "auto":
        return torch.device(cfg.plan.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _memory_note(cfg, memory_budget: int) -> str:
    """Which bytes value the planner used: GB (10^9) and GiB (2^30) differ by 7%."""
    from ..units import describe_bytes

    if cfg.budget.memory is None:
        return f"memory budget {describe_bytes(memory_budget)}: what the device has (95% of a GPU, 90% of free RAM)"
    note = f"budget.memory {cfg.budget.memory!r} read as {memory_budget:,} bytes = {describe_bytes(memory_budget)}"
    if isinstance(cfg.budget.memory, str) and cfg.budget.memory.strip().lower().endswith(("gb", "tb")):
        note += " (GB/TB are powers of ten; a card sold as \"24 GB\" has 24 GiB: write GiB for powers of two)"
    return note


def memory_budget_bytes(cfg, device: torch.device) -> int:
    from ..errors import ConfigError

    if cfg.budget.memory is not None:
        return int(parse_bytes(cfg.budget.memory))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("plan.device is cuda but this machine has no GPU: set budget.memory (e.g. 24GB)")
        return int(torch.cuda.get_device_properties(device).total_memory * 0.95)
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def distributed_setup(cfg) -> tuple[int, int]:
    """(world size, ZeRO stage) the run will have: the config's plan.* keys, else what the launcher
    says — torchrun/accelerate set WORLD_SIZE; `accelerate launch` with a DeepSpeed or FSDP config
    sets ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_ZERO_STAGE or ACCELERATE_USE_FSDP."""
    env = os.environ
    world = cfg.plan.world_size or int(env.get("WORLD_SIZE", "1"))
    if cfg.plan.zero_stage is not None:
        return world, cfg.plan.zero_stage
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return world, int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION") == "2":  # FSDP2: not resharding after forward keeps full weights, like ZeRO-2
            return world, 3 if env.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "true" else 2
        return world, 2 if env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper() in ("SHARD_GRAD_OP", "2") else 3
    return world, 0


def optimizer_extra(cfg) -> dict:
    """The optimizer options the memory model needs (projection rank, FRUGAL's subspace)."""
    return {"galore_rank": cfg.optim.rank, "frugal_subspace": cfg.optim.subspace, "frugal_density": cfg.optim.density,
            "layerwise": cfg.optim.layerwise, "natural_history": cfg.optim.history,
            "objective": cfg.objective.name}  # dpo with an adapter: a reference forward per step (step_flops_per_token)


def batch_is_open(cfg) -> bool:
    """The planner may choose the tokens per optimizer step: the user set neither train.batch_tokens
    nor train.grad_accum (with grad_accum set, rows per step = micro_batch × grad_accum as configured).
    A pinned train.micro_batch alone is a memory/speed detail: accumulation fills the chosen batch."""
    return cfg.train.batch_tokens is None and "train.grad_accum" not in cfg.explicit


def rows_per_process(cfg, world: int, planned_rows: int | None = None, tokens_per_row: float | None = None) -> int:
    """Rows per optimizer step on each process: the pinned batch, else the planner's, else the config's.
    `tokens_per_row`: real tokens per unpacked row on average (None: rows of data.seq_len)."""
    if cfg.train.batch_tokens is not None:
        return rows_from_batch_tokens(parse_count(cfg.train.batch_tokens), tokens_per_row or cfg.data.seq_len, world) // world
    if planned_rows is not None and batch_is_open(cfg):
        return max(1, planned_rows // world)
    return cfg.train.micro_batch * cfg.train.grad_accum


def systems(cfg, device: torch.device) -> dict:
    """The recipe's systems fields for this device: precision, attention implementation, Liger's fused loss."""
    from ..attention import resolve
    from ..fastpath import resolve_precision, use_liger

    return {"precision": resolve_precision(cfg, device.type), "attention": resolve(cfg.model.attn_implementation, device.type),
            "fused_loss": use_liger(cfg, device.type)}


def candidate_recipes(cfg, device: torch.device, planned_rows: int | None = None, tokens_per_row: float | None = None) -> list[Recipe]:
    """Every recipe the config leaves open. `planned_rows`: rows per step (all processes) that the
    planner chose for the budget (plan/batch.py); pinned keys win over it. `tokens_per_row`: see rows_per_process."""
    pinned = cfg.explicit
    methods = [cfg.method.name] if "method.name" in pinned or cfg.method.name not in ("full", "lora") else ["full", "lora"]
    world, zero = distributed_setup(cfg)
    rows_per_step = rows_per_process(cfg, world, planned_rows, tokens_per_row)
    if "train.micro_batch" in pinned:
        mb = cfg.train.micro_batch  # pinned: a floor on the rows per step
        shapes = [(mb, cfg.train.grad_accum if "train.grad_accum" in pinned else max(1, round(rows_per_step / mb)))]
    else:
        shapes = [(mb, rows_per_step // mb) for mb in range(1, min(rows_per_step, 64) + 1) if rows_per_step % mb == 0
                  and (mb & (mb - 1) == 0 or mb == rows_per_step)]  # powers of two, and the whole step at once
    if updates_in_backward(cfg.optim):  # updates inside backward: no accumulation possible
        shapes = [(mb * ga, 1) for mb, ga in shapes if ga == 1] or [(rows_per_step, 1)]
    ckpts = [cfg.model.gradient_checkpointing] if "model.gradient_checkpointing" in pinned else [False, True]
    r = getattr(cfg.method, "r", 16)

    def options(method: str) -> dict:
        # the config's own method keeps all its options; an alternative the planner adds gets its defaults and r
        return dataclasses.asdict(cfg.method) if method == cfg.method.name else {"name": method, "r": r}

    def quantizations(method: str) -> list:
        # model.quantize set (even to null) is pinned; otherwise QLoRA (nf4) is a candidate for a
        # method that runs on a quantised base, when bitsandbytes is installed
        if "model.quantize" in pinned or cfg.model.quantize:
            return [cfg.model.quantize]
        from ..methods import METHODS

        if getattr(METHODS.get(method), "quantized_base", False) and importlib.util.find_spec("bitsandbytes"):
            return [None, "nf4"]
        return [None]

    return [
        Recipe(method=m, lora_r=r, micro_batch=mb, grad_accum=ga, seq_len=cfg.data.seq_len, gradient_checkpointing=ck,
               world_size=world, zero_stage=zero,
               optimizer=cfg.optim.name, packed=cfg.data.pack, quantize=q, **systems(cfg, device),
               extra={"method_options": options(m), "double_quant": cfg.model.double_quant, **optimizer_extra(cfg)})
        for m in methods for q in quantizations(m) for mb, ga in shapes for ck in ckpts
    ]


PROBE_BATCH_MAX_PARAMS = 1e9  # below this a random-init probe is quick, and FLOP-based guesses are furthest off


def make_plan(cfg, probe_steps: int | None = None, log=print, measure_batch_speed: bool | None = None) -> Plan:
    """Rank the candidate recipes for this config on this machine.

    `measure_batch_speed`: time one step of the top recipe before choosing the batch from the tokens
    a time budget buys (default: when probing is on, or for models under 1B parameters on this
    machine — FLOP-based guesses are furthest off for small models, whose steps are overhead-bound)."""
    device = target_device(cfg)
    here = device.type == "cpu" or torch.cuda.is_available()
    config = plan_model_config(cfg)
    memory_budget = memory_budget_bytes(cfg, device)
    trainable_cap = parse_count(cfg.budget.trainable) if cfg.budget.trainable is not None else None
    unique = estimate_unique_tokens(cfg)
    achieved = device_flops_guess(device)
    counts: dict[str, tuple[int, int, int]] = {}
    rows: dict = {}

    def row_lengths():  # the data's unpacked row lengths, read once and only when a probe runs
        if "lengths" not in rows:
            rows["lengths"], why_not = probe_row_lengths(cfg, unique)
            if why_not:
                notes.append(why_not)
        return rows["lengths"]

    def evaluate(recipes: list[Recipe]) -> list[Candidate]:
        out = []
        for recipe in recipes:
            if recipe.method not in counts:
                counts[recipe.method] = parameter_counts(config, recipe)
            total, n_matmul, n_trainable = counts[recipe.method]
            memory = with_allocator(estimate_memory(config, recipe, device.type), recipe, device.type)  # what RSS will show
            fpt = step_flops_per_token(config, recipe, n_matmul, n_trainable)
            c = Candidate(recipe, memory, memory.trainable, fpt, achieved / fpt)
            if memory.total > memory_budget:
                biggest = max(memory.terms, key=memory.terms.get)
                c.fits, c.why_not = False, (f"needs {format_bytes(memory.total)} > {format_bytes(memory_budget)} "
                                            f"(largest term: {biggest} {format_bytes(memory.terms[biggest])})")
            elif trainable_cap is not None and c.trainable > trainable_cap:
                c.fits, c.why_not = False, f"{format_count(c.trainable)} trainable parameters > cap {format_count(trainable_cap)}"
            out.append(c)
        return out

    def tokens_per_row() -> float | None:  # a batch in tokens counts real ones: unpacked rows hold the data's mean
        if cfg.data.pack or not (batch_is_open(cfg) or cfg.train.batch_tokens is not None):
            return None
        lengths = row_lengths()
        return float(lengths.mean()) if lengths is not None else None

    method_rank = {"full": 0, "lora": 1}
    rank = lambda c: (not c.fits, method_rank.get(c.recipe.method, 2), c.recipe.quantize is not None, -c.tokens_per_s,  # noqa: E731
                      c.recipe.gradient_checkpointing, -c.recipe.micro_batch)
    notes = [_memory_note(cfg, memory_budget)]
    per_row = tokens_per_row()
    candidates = sorted(evaluate(candidate_recipes(cfg, device, tokens_per_row=per_row)), key=rank)
    batch, measured, timed = None, None, []
    if batch_is_open(cfg) and candidates:
        # the objective is the model at the end of the budget: the batch follows the tokens it buys
        best = candidates[0]
        total, n_matmul, _ = counts[best.recipe.method]
        if measure_batch_speed is None:
            measure_batch_speed = bool(probe_steps) or (total < PROBE_BATCH_MAX_PARAMS and (device.type == "cpu" or torch.cuda.is_available()))
        if measure_batch_speed and cfg.budget.time is not None and best.fits:
            # time the step the run will probably take — the rule's batch at the device guess's speed — not the
            # largest micro-batch memory allows: 8 rows of 512 on SmolLM2-135M cost ~100 s of a 300 s CPU budget
            guess = choose_batch(Budget.from_config(cfg.budget), best.tokens_per_s, best.flops_per_token, cfg.data.seq_len,
                                 best.recipe.world_size, scratch=cfg.model.init == "scratch", tokens_per_row=per_row)
            expected = max(1, guess.rows_per_step // best.recipe.world_size) if guess is not None else best.recipe.micro_batch
            probed = dataclasses.replace(best, recipe=dataclasses.replace(best.recipe, micro_batch=min(expected, best.recipe.micro_batch)))
            timed = _calibrate(config, [probed], 1, device, log, row_lengths())
            best.tokens_per_s = measured = probed.tokens_per_s
        batch = choose_batch(Budget.from_config(cfg.budget), best.tokens_per_s, best.flops_per_token, cfg.data.seq_len,
                             best.recipe.world_size, scratch=cfg.model.init == "scratch",
                             non_embedding_params=non_embedding_parameters(config, n_matmul),
                             choose_lr="optim.lr" not in cfg.explicit, tokens_per_row=per_row)
        if batch is not None:
            candidates = sorted(evaluate(candidate_recipes(cfg, device, batch.rows_per_step)), key=rank)
            notes.append(batch.describe(cfg.data.seq_len))
    steps = probe_steps if probe_steps is not None else (2 if cfg.plan.probe and here else 0)
    if steps and candidates and candidates[0].fits:
        timed += _calibrate(config, [c for c in candidates if c.fits][:4], steps, device, log, row_lengths())
        notes.append(f"speed calibrated by a {steps}-step probe on {device.type} (random-init weights, synthetic tokens)")
        candidates.sort(key=rank)
    else:
        notes.append(f"speed from a device guess of {achieved / 1e9:.0f} GFLOP/s (no probe)")
    time_s = parse_duration(cfg.budget.time) if cfg.budget.time is not None else None
    for c in candidates:
        if time_s is not None:
            c.tokens_in_budget = c.tokens_per_s * time_s
            c.epochs = c.tokens_in_budget / unique if unique else None
    from ..data.mixture import plan_note

    mixture = plan_note(cfg, candidates[0].tokens_in_budget if candidates else None)
    if mixture:
        notes.append(mixture)
    scratch = None
    if cfg.model.init == "scratch":
        budget_flops = parse_count(cfg.budget.flops) if cfg.budget.flops is not None else None
        if budget_flops is None and time_s is not None and candidates:
            budget_flops = (candidates[0].tokens_per_s * candidates[0].flops_per_token) * time_s
        if budget_flops:
            scratch = propose_scratch(budget_flops, unique)
    lengths = rows.get("lengths")
    if lengths is not None:
        notes.append(probe_shape_note(lengths, timed))
    best = next((c for c in candidates if c.fits), None)
    if best is not None and "optim.lr" not in cfg.explicit and method_lr_scale(best.recipe.method) != 1.0:
        notes.append(f"peak LR {planned_lr(cfg, batch, best.recipe.method):.3g}: {best.recipe.method} is an adapter method, trained at "
                     f"{method_lr_scale(best.recipe.method):g}× the base LR {planned_lr(cfg, batch, 'full'):.3g} (pin optim.lr to choose it)")
    return Plan(device.type, memory_budget, candidates, unique, scratch, notes, batch, measured,
                float(lengths.mean()) if lengths is not None else None)


def probe_row_lengths(cfg, unique_tokens: float | None) -> tuple["np.ndarray | None", str]:
    """(real tokens per training row, why not): the lengths the probe times unpacked rows at
    (data.pack: false), from the tokenisation cache — tokenising now when it has no entry, which the
    run's data preparation then reads. None with packed rows (full rows are timed), and, with a note,
    when the data is not on this machine or several processes plan at once (each would tokenise):
    the probe then times rows of data.seq_len, the longest the data can give."""
    if cfg.data.pack:
        return None, ""
    if unique_tokens is None:
        return None, "probe: data.train is not on this machine: unpacked rows timed at data.seq_len (the longest they can be)"
    world, _ = distributed_setup(cfg)
    if world > 1:
        return None, f"probe: {world} processes plan at once: unpacked rows timed at data.seq_len (the longest they can be)"
    from ..data import row_lengths
    from ..models import load_tokenizer

    quiet = lambda m: None  # noqa: E731  (the run's data preparation says what it reads)
    return row_lengths(cfg, load_tokenizer(cfg, log=quiet), log=quiet), ""


def probe_shape_note(lengths, timed: list[tuple[int, int]]) -> str:
    """What shape the probe timed unpacked rows at (`timed`: (micro-batch, width) pairs), and why."""
    shapes = ", ".join(f"{width} tokens for {mb} row(s)" for mb, width in sorted(set(timed)))
    return (f"probe: unpacked rows ({len(lengths):,}, mean {lengths.mean():.0f} tokens, longest {int(lengths.max())}) timed at "
            f"{shapes} — the mean longest row of a micro-batch, which padding trims each batch to; memory is still "
            "predicted for rows of data.seq_len, the longest a batch can be")


def non_embedding_parameters(config, n_matmul: int) -> float:
    """Step Law's N: the matmul parameters without the LM head (the embedding is no matmul)."""
    head = (getattr(config, "vocab_size", 0) or 0) * (getattr(config, "hidden_size", 0) or 0)
    return float(max(1, n_matmul - head))


def _calibrate(config, candidates: list[Candidate], steps: int, device: torch.device, log, row_lengths=None) -> list[tuple[int, int]]:
    """Probe each candidate on a random-init model and replace the predicted speed with the measured one.
    `row_lengths`: real tokens per row of unpacked data (`probe_row_lengths`), for the probe's shape.
    Returns the (micro-batch, row length) shapes timed."""
    from transformers import AutoModelForCausalLM

    shapes = []
    for c in candidates:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device)
        if c.recipe.precision == "pure-bf16":
            model = model.to(torch.bfloat16)
        if c.recipe.quantize:  # the probe runs on the quantised base it times
            from ..quantize import bnb_config, quantize_model

            model = quantize_model(model, bnb_config(c.recipe.quantize, device, c.recipe.extra.get("double_quant", True)),
                                   torch.bfloat16 if c.recipe.precision == "bf16-mixed" else torch.float32)
        model = prepare_method(model, c.recipe)
        if c.recipe.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if c.recipe.precision == "bf16-mixed" else _null()
        with autocast:
            result = probe(model, c.recipe, c.flops_per_token, steps, device, row_lengths=row_lengths)
        # the probe times next-token steps; a DPO step also runs the reference forward
        slower = reference_pass_factor(config, c.recipe, c.flops_per_token, matmul_parameters(model)[0])
        c.tokens_per_s, c.probed = result.tokens_per_s / slower, True
        log(f"probe {c.recipe.method}{'+' + c.recipe.quantize if c.recipe.quantize else ''} mb={c.recipe.micro_batch} "
            f"ckpt={c.recipe.gradient_checkpointing}{f' rows of {result.width}' if result.width not in (None, c.recipe.seq_len) else ''}: "
            f"{result.tokens_per_s:,.0f} tokens/s")
        shapes.append((c.recipe.micro_batch, result.width or c.recipe.seq_len))
        del model
    return shapes


def _null():
    import contextlib

    return contextlib.nullcontext()


def apply_plan(cfg, plan: Plan):
    """The config with the best recipe's choices filled into what the user left open."""
    from ..config import load_config

    best = plan.best
    if best is None:
        return cfg
    r = best.recipe
    overrides = {}
    if "method.name" not in cfg.explicit and r.method != cfg.method.name:
        overrides["method"] = {"name": r.method}
    train = {k: v for k, v in (("micro_batch", r.micro_batch), ("grad_accum", r.grad_accum)) if f"train.{k}" not in cfg.explicit}
    if train:
        overrides["train"] = train
    if "optim.lr" not in cfg.explicit:
        lr = planned_lr(cfg, plan.batch, r.method)
        if lr != cfg.optim.lr:
            overrides["optim"] = {"lr": lr}
    if "model.gradient_checkpointing" not in cfg.explicit:
        overrides["model"] = {"gradient_checkpointing": r.gradient_checkpointing}
    if "model.quantize" not in cfg.explicit and r.quantize != cfg.model.quantize:
        overrides.setdefault("model", {})["quantize"] = r.quantize  # QLoRA: LoRA did not fit unquantised
    if not overrides:
        return cfg
    planned = load_config(cfg, overrides)
    object.__setattr__(planned, "_explicit", cfg.explicit)  # planner choices are not user pins
    return planned


def planned_lr(cfg, batch: BatchChoice | None, method: str) -> float:
    """The peak LR for `method` when optim.lr is open: the base (Step Law's from scratch, else optim.lr)
    times the method's factor (an adapter trains at a larger LR: plan/batch.py)."""
    base = batch.lr if batch is not None and batch.lr is not None else cfg.optim.lr
    return base * method_lr_scale(method)


def recipe_from_config(cfg, device: torch.device) -> Recipe:
    world, zero = distributed_setup(cfg)
    return Recipe(
        world_size=world, zero_stage=zero,
        method=cfg.method.name, lora_r=getattr(cfg.method, "r", 16),
        extra={"method_options": dataclasses.asdict(cfg.method), "double_quant": cfg.model.double_quant, **optimizer_extra(cfg)},
        micro_batch=cfg.train.micro_batch,
        grad_accum=cfg.train.grad_accum, seq_len=cfg.data.seq_len, gradient_checkpointing=cfg.model.gradient_checkpointing,
        optimizer=cfg.optim.name, packed=cfg.data.pack, **systems(cfg, device),
        quantize=cfg.model.quantize,
    )


def step_tokens(rows: int, prediction: dict | None, seq_len: int) -> int:
    """Tokens in an optimizer step of `rows` rows: rows of seq_len, or for unpacked rows the real tokens
    they hold on average (`plan_for_training`'s prediction counted them)."""
    return round(rows * ((prediction or {}).get("tokens_per_row") or seq_len))


def plan_for_training(cfg, log=print):
    """(config to train, prediction for it): the planner's choices applied to what the config leaves open."""
    from ..errors import BudgetuneError

    try:
        plan = make_plan(cfg, probe_steps=0, log=log)
    except ValueError as e:  # the memory model raises ValueError for what it cannot model
        log(f"planner: {e}; training the config as given, without a prediction")
        return cfg, None
    if cfg.plan.auto:
        if plan.best is None:
            reasons = "; ".join(sorted({f"{c.recipe.method}: {c.why_not}" for c in plan.candidates})[:3])
            raise BudgetuneError(f"no recipe fits the budget ({reasons}); lower data.seq_len or train.micro_batch, "
                                 "allow LoRA (leave method.name unset), or raise budget.memory")
        cfg = apply_plan(cfg, plan)
        if plan.batch is not None:
            log(f"planner: {plan.batch.describe(cfg.data.seq_len)}")
    chosen = recipe_from_config(cfg, target_device(cfg))
    match = next((c for c in plan.candidates if c.recipe == chosen), None)
    prediction = None
    if match is not None:
        prediction = {"peak_memory_mb": round(match.memory.total / 2**20, 1), "tokens_per_s": round(match.tokens_per_s, 1),
                      "flops_per_token": match.flops_per_token,
                      "measured_tokens_per_s": round(plan.measured_tokens_per_s, 1) if plan.measured_tokens_per_s else None,
                      "tokens_per_row": round(plan.tokens_per_row, 1) if plan.tokens_per_row else None,  # unpacked: real, on average
                      "tokens_per_s_basis": "probed" if match.probed else "device guess, uncalibrated",
                      "fits": match.fits, "memory_terms_mb": {k: round(v / 2**20, 1) for k, v in match.memory.terms.items()},
                      "peak_memory_basis": allocator_basis(match.memory) if match.memory.terms.get("allocator") else "live tensors"}
    return cfg, prediction
