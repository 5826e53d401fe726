"""Typed run config: dataclasses, YAML + command-line merge, validation that names the key.

A config is one YAML file; every key can be overridden on the command line with
`--section.key value` (the value is parsed as YAML: `--budget.time 90s`, `--method.r 8`).
Unknown keys and wrong types fail before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sysconfig
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .method_options import MethodOptions
from .units import parse_bytes, parse_count, parse_duration

Interval = typing.Union[float, str, None]  # fraction of the budget (0 < x ≤ 1), a duration ("5m") or "auto"


@dataclass
class ModelConfig:
    name: str | None = None  # Hugging Face hub id, local folder, a .gguf file, or a named model (smollm2-135m-instruct: `budgetune fetch` it first)
    gguf_file: str | None = None  # a GGUF file inside the model.name folder (llama.cpp format, loaded dequantised; needs the `gguf` extra)
    init: Literal["pretrained", "scratch"] = "pretrained"  # pretrained: load model.name's weights; scratch: random init from a preset/config
    preset: str | None = None  # scratch only: a named tiny architecture (see models.PRESETS)
    arch: dict = field(default_factory=dict)  # scratch only: config kwargs over the preset / model.name config
    trust_remote_code: bool = False  # run a model's own Python code (auto_map); off unless you trust the source
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU; bf16 frozen base for adapters on a GPU
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more compute); the planner may turn it on
    attn_implementation: str = "auto"  # auto: flash_attention_2 (flash-attn varlen) on a GPU with flash_attn installed, else flex_attention on a GPU, else sdpa; or name one (sdpa, eager, flash_attention_2, flex_attention)
    liger: bool | str = "auto"  # Liger Kernel (RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy): auto = on a GPU when liger-kernel is installed (the `liger` extra); else the chunked loss
    quantize: Literal["nf4", "fp4", "int8"] | None = None  # QLoRA: store the frozen base quantised by bitsandbytes (adapter methods only; embeddings and LM head stay unquantised)
    double_quant: bool = True  # 4-bit only: quantise the quantisation constants again (~0.37 bit/parameter less)


@dataclass
class TokenizerConfig:
    name: str | None = None  # hub id / folder; defaults to model.name
    train_vocab_size: int = 0  # > 0: train a byte-level BPE tokenizer on the training data (cached)
    chat_template: str | None = None  # Jinja template; default one is used when the tokenizer has none


@dataclass
class SourceConfig:
    """One weighted source of a mixture: an entry of data.train written as a mapping."""

    path: list[str] = field(default_factory=list)  # files, folders or globs of this source
    weight: float | None = None  # share of training tokens (weights are normalised); give every source one, or none
    name: str | None = None  # label in the log and summary; default: its first path
    format: Literal["auto", "text", "prompt_completion", "chat"] | None = None  # default: data.format
    text_field: str | None = None  # default: data.text_field
    prompt_field: str | None = None  # default: data.prompt_field
    completion_field: str | None = None  # default: data.completion_field
    messages_field: str | None = None  # default: data.messages_field


@dataclass
class SelectConfig:
    """Data selection: train on the examples a method ranks best (docs/howto.md)."""

    method: Literal["off", "random", "length", "loss", "ifd", "cdas", "rds"] = "off"  # how examples are ranked; off: keep all
    fraction: float | str = 1.0  # share of the training tokens kept (0 < x ≤ 1), or "auto": as many tokens as the budget buys
    target: list[str] = field(default_factory=list)  # rds: examples of the wanted behaviour (same format); default: the held-out split
    clusters: int = 0  # cdas: k-means clusters; 0 = √(examples / 2)
    batch: int = 8  # examples per forward pass when scoring with the model (loss, ifd, cdas, rds)


@dataclass
class DataConfig:
    train: list[str | SourceConfig] = field(default_factory=list)  # files, folders or globs (`{stdlib}` expands); or sources {path, weight, format, ...}
    eval: list[str] = field(default_factory=list)  # held-out data; default: a split of train
    format: Literal["auto", "text", "prompt_completion", "chat", "sharegpt", "alpaca", "preference"] = "auto"  # auto: from the fields of the first record
    seq_len: int = 1024  # tokens per row (packed rows hold several examples)
    pack: bool = True  # padding-free packing (METHODS.md §5)
    eval_fraction: float = 0.05  # share of examples held out when data.eval is empty (seeded)
    max_files: int = 0  # 0 = all files of a folder
    text_field: str = "text"  # JSONL/Parquet field of plain text
    prompt_field: str = "prompt"  # field of the prompt (no loss on it)
    completion_field: str = "completion"  # field of the completion (the loss)
    messages_field: str = "messages"  # field of chat messages [{role, content}] (loss on assistant turns)
    conversations_field: str = "conversations"  # sharegpt: field of the turns [{from, value}]
    instruction_field: str = "instruction"  # alpaca: the instruction (the user turn)
    input_field: str = "input"  # alpaca: optional input, appended to the instruction
    output_field: str = "output"  # alpaca: the response (the loss)
    chosen_field: str = "chosen"  # preference: the preferred answer (a string, or a chat message list)
    rejected_field: str = "rejected"  # preference: the rejected answer (a string, or a chat message list)
    roles: dict = field(default_factory=dict)  # chat/sharegpt role names → system, user, assistant, tool, e.g. {bot: assistant}; human/gpt are known
    cache_dir: str | None = None  # tokenisation cache; default ~/.cache/budgetune
    on_error: Literal["error", "skip"] = "error"  # a bad record: stop naming it, or skip it (counted in the summary)
    dedup: Literal["off", "exact", "near"] = "off"  # drop duplicate examples: exact (normalised text) or near (MinHash LSH)
    near_threshold: float = 0.8  # dedup near: estimated Jaccard similarity of word 3-grams above which examples are duplicates
    replay: list[str] = field(default_factory=list)  # old-domain data mixed in for continual pre-training (share: data.replay_weight)
    replay_weight: float = 0.1  # share of training tokens from data.replay; the data.train sources share the rest
    select: SelectConfig = field(default_factory=SelectConfig)  # data selection under a budget (data.select.*)


@dataclass
class ObjectiveConfig:
    """What the loss is: next-token SFT, or a preference objective on chosen/rejected pairs (docs/methods.md)."""

    name: Literal["sft", "dpo", "orpo", "simpo"] = "sft"  # sft: next-token loss; dpo, orpo, simpo: preference tuning (needs preference data)
    beta: float | None = None  # dpo/simpo: β (strength of the reward scale); orpo: unused; null = 0.1 (dpo) or 2.0 (simpo)
    odds_weight: float = 0.1  # orpo: λ, weight of the odds-ratio term added to the SFT loss on the chosen answer
    gamma: float = 1.0  # simpo: γ, the target reward margin


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, sgd, adamw8bit, adamw_fp8, galore, frugal, lomo, apollo, apollo_mini, gum, natural_galore
    lr: float = 3e-4  # peak learning rate; the schedule scales it by budget progress. Left unset: adapter methods train at 4× it, from scratch Step Law gives it
    weight_decay: float = 0.0  # decoupled, matrices only
    beta1: float = 0.9  # Adam β1 (SGD: momentum)
    beta2: float = 0.95  # Adam β2
    eps: float = 1e-8  # Adam ε
    grad_clip: float = 1.0  # 0 = off
    rank: int = 128  # galore/frugal/apollo/gum/natural_galore: rank of the gradient projection
    update_gap: int = 200  # galore/frugal/apollo/apollo_mini/gum/natural_galore: optimizer steps between subspace refreshes
    scale: float = 0.25  # galore/frugal/natural_galore: scale α of the projected (Adam) update
    subspace: Literal["svd", "random", "blocks"] = "svd"  # frugal: how the state-full subspace is chosen
    density: float = 0.25  # frugal blocks: fraction of matrices with Adam at a time; gum: probability q that a matrix takes the full-rank, debiasing update in a period
    sign_lr_ratio: float = 1.0  # frugal: signSGD step on the residual, relative to lr
    apollo_scale: float | None = None  # apollo/apollo_mini: the update's scale α (×√α); null = the paper's, 1 (apollo) or 128 (apollo_mini)
    history: int = 10  # natural_galore: projected gradients s kept for the empirical Fisher
    damping: float = 0.1  # natural_galore: Tikhonov λ of that Fisher, relative to the gradients' mean squared norm
    layerwise: bool = False  # galore/frugal/adamw_fp8/gum/natural_galore: update each weight inside backward, gradients freed at once


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant, linear, cosine, rex, wsd: a function of budget progress
    warmup: float = 0.02  # fraction of the budget
    min_ratio: float = 0.0  # the LR's floor as a fraction of optim.lr
    decay: float = 0.2  # WSD: fraction of the budget spent annealing
    decay_shape: Literal["linear", "sqrt", "exp"] = "linear"  # WSD: shape of the final decay


@dataclass
class BudgetConfig:
    time: str | float | None = None  # "90s", "10m", "2h" or seconds; the whole train command after model load
    tokens: str | int | None = None  # training tokens (non-padding), e.g. 5M
    steps: int | None = None  # optimizer steps
    flops: str | float | None = None  # training FLOPs, e.g. 1e15
    reserve: str | float | None = None  # seconds kept for the final eval + save; default: measured
    memory: str | float | None = None  # device memory for training, e.g. 24GB; default: what the device has
    trainable: str | int | None = None  # cap on trainable parameters, e.g. 50M


@dataclass
class TrainConfig:
    batch_tokens: str | int | None = None  # tokens per optimizer step (all processes; unpacked rows count their real tokens); null = the planner picks it from the tokens the budget buys
    micro_batch: int = 8  # rows per forward/backward; the planner may change it when you do not set it
    grad_accum: int = 1  # micro-batches per optimizer step (rows per step = micro_batch × grad_accum × processes)
    seed: int = 0  # model init, data order, held-out split
    deterministic: bool = False  # torch deterministic algorithms (bit-exact resume checks)
    fast_forward: int = 0  # adapter methods: every N optimizer steps, repeat the last update while a tiny held-out loss falls (0 = off)
    fast_forward_rows: int = 4  # held-out rows (of data.seq_len tokens) that judge the repeats; not used by the reported eval
    precision: Literal["auto", "fp32", "bf16-mixed", "pure-bf16"] = "auto"  # auto: bf16-mixed (bf16 autocast, fp32 master weights) on a GPU, fp32 on the CPU; pure-bf16: bf16 weights and AdamW states with Kahan-compensated updates (the `bf16` extra)
    compile: bool | str = False  # torch.compile each decoder layer: true, false, or auto (on a GPU for an unquantised model unless budget.time is under 10 minutes)
    max_bad_steps: int = 5  # non-finite steps in a row before going back to the last checkpoint (LR halved), then stopping


@dataclass
class EvalConfig:
    every: Interval = "auto"  # fraction of the budget, a duration, or auto (periodic evals cost ≤ 2% of a time budget, at most 4); null = only at start and end
    max_tokens: int = 65536  # cap on held-out tokens per evaluation
    prompts: list[str] = field(default_factory=list)  # generation samples at the end
    sample_tokens: int = 48  # new tokens per generation sample
    temperature: float = 0.0  # generation samples: 0 = greedy; > 0 samples (seeded by train.seed)
    repetition_penalty: float = 1.0  # generation samples: > 1 discourages repeating tokens (1 = off)


@dataclass
class CheckpointConfig:
    every: Interval = "auto"  # fraction of the budget, a duration ("5m"), or auto (every 10 minutes of wall-clock); null = only at the end
    keep: int = 2  # newest checkpoints kept
    background: bool | str = "auto"  # write periodic checkpoints from a thread while training goes on; auto: once a write takes ≥ 1 s


@dataclass
class PlanConfig:
    auto: bool = True  # train: the planner picks what the config leaves open (method, micro-batch, checkpointing)
    probe: bool = True  # `plan`: time a few real steps of the top candidates to calibrate speed
    device: Literal["auto", "cpu", "cuda"] = "auto"  # plan for another machine's device (no probe then)
    world_size: int = 0  # processes that share the work; 0 = from the launcher (WORLD_SIZE), else 1
    zero_stage: int | None = None  # ZeRO stage 0-3 (FSDP full shard = 3); None = from `accelerate launch`'s config


@dataclass
class TuneSpaceConfig:
    """What the race may vary (tune.space.*); a key you pinned elsewhere (optim.lr, method.name, method.r, optim.name) is never raced."""

    lr: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])  # LR factors (log grid) around the method's default LR
    methods: list[str] = field(default_factory=list)  # methods raced; empty: full and lora, those that fit the memory budget
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32])  # adapter methods: method.r values raced
    optimizers: list[str] = field(default_factory=list)  # optimizers raced (e.g. [adamw, adamw_fp8, galore]), those that fit; empty: optim.name only


@dataclass
class TuneConfig:
    """The budget race (`budgetune tune`, or `train` with tune.fraction set): race candidate recipes on a share of the budget by successive halving, then train the winner."""

    fraction: float | None = None  # share of the budget the race spends (`budgetune tune`: 0.15 when unset); `train` races only when it is set
    eta: int = 3  # successive halving: each rung keeps the best 1/eta of the trials and gives them eta × the budget
    mode: Literal["cooldown", "branch"] = "cooldown"  # how a trial's loss is read: after its own LR cooldown, or on a short WSD cooldown branch of a constant-LR trunk
    min_steps: int = 20  # optimizer steps the shortest trial must get; the grid shrinks until the budget affords them
    eval_tokens: int = 16384  # held-out tokens per trial reading (at most eval.max_tokens)
    space: TuneSpaceConfig = field(default_factory=TuneSpaceConfig)  # what the race varies (tune.space.*)


@dataclass
class OutputConfig:
    dir: str = "runs/run"  # the run folder: config, metrics, checkpoints, model, report
    overwrite: bool = False  # replace a run already in output.dir (same as --overwrite)
    report: bool = True  # write RUN_DIR/report.html at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodOptions = field(default_factory=MethodOptions)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # the budget race (tune.*): `budgetune tune`, or `train` with tune.fraction set
    tracking: list[str] = field(default_factory=list)  # experiment trackers through accelerate: tensorboard, wandb, mlflow

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def explicit(self) -> frozenset[str]:
        """Dotted keys the user set (file or command line): the planner never changes them."""
        return getattr(self, "_explicit", frozenset())


# ---------------------------------------------------------------------------------------
# Building a Config from plain dicts, with errors that name the key


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(classes) == 1:  # a mapping: report that class's own errors
            return _coerce(value, classes[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                count = parse_count(value)
            except ValueError:
                pass
            else:
                if count.is_integer():
                    return int(count)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in our dataclasses


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if cls is Config and name == "method":
            kwargs[name] = _build_method(data[name], full)
        else:
            kwargs[name] = _coerce(data[name], hints[name], full)
    return cls(**kwargs)


def _build_method(data: Any, key: str) -> MethodOptions:
    from .methods import METHODS

    if isinstance(data, str):
        data = {"name": data}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{key}': expected a mapping, got {data!r}")
    name = data.get("name", "full")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"config key '{key}.name': unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return _build(METHODS[name].Options, data, key)


def _validate(cfg: Config) -> None:
    from .optim import OPTIMIZERS
    from .schedules import PROFILES

    def positive(key: str, value, allow_zero=False):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"config key '{key}': must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")

    b = cfg.budget
    for key, parse in (("time", parse_duration), ("reserve", parse_duration), ("tokens", parse_count), ("flops", parse_count),
                       ("memory", parse_bytes), ("trainable", parse_count)):
        raw = getattr(b, key)
        if raw is not None:
            try:
                positive(f"budget.{key}", parse(raw), allow_zero=key == "reserve")
            except ValueError as e:
                raise ConfigError(f"config key 'budget.{key}': {e}") from None
    positive("budget.steps", b.steps)
    if all(getattr(b, k) is None for k in ("time", "tokens", "steps", "flops")):
        raise ConfigError("no budget given: set at least one of budget.time, budget.tokens, budget.steps, budget.flops")
    positive("data.seq_len", cfg.data.seq_len)
    if cfg.data.seq_len < 2:
        raise ConfigError("config key 'data.seq_len': must be at least 2")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.train.batch_tokens is not None:
        try:
            positive("train.batch_tokens", parse_count(cfg.train.batch_tokens))
        except ValueError as e:
            raise ConfigError(f"config key 'train.batch_tokens': {e}") from None
    for name, role in cfg.data.roles.items():
        if role not in ("system", "user", "assistant", "tool"):
            raise ConfigError(f"config key 'data.roles.{name}': {role!r} is not one of 'system', 'user', 'assistant', 'tool'")
    positive("train.micro_batch", cfg.train.micro_batch)
    positive("train.grad_accum", cfg.train.grad_accum)
    positive("train.fast_forward", cfg.train.fast_forward, allow_zero=True)
    positive("train.fast_forward_rows", cfg.train.fast_forward_rows)
    positive("train.max_bad_steps", cfg.train.max_bad_steps)
    positive("plan.world_size", cfg.plan.world_size, allow_zero=True)
    if cfg.plan.zero_stage is not None and cfg.plan.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'plan.zero_stage': 0, 1, 2 or 3, got {cfg.plan.zero_stage}")
    positive("optim.lr", cfg.optim.lr)
    positive("optim.grad_clip", cfg.optim.grad_clip, allow_zero=True)
    if cfg.optim.name == "gum" and not 0 < cfg.optim.density <= 1:
        raise ConfigError(f"config key 'optim.density': gum's sampling probability must be in (0, 1], got {cfg.optim.density}")
    if cfg.optim.name == "natural_galore":
        positive("optim.damping", cfg.optim.damping)
        positive("optim.history", cfg.optim.history)
    positive("eval.max_tokens", cfg.eval.max_tokens)
    if cfg.tune.fraction is not None and not 0 < cfg.tune.fraction < 1:
        raise ConfigError(f"config key 'tune.fraction': must be in (0, 1), got {cfg.tune.fraction}")
    if cfg.tune.eta < 2:
        raise ConfigError(f"config key 'tune.eta': must be at least 2, got {cfg.tune.eta}")
    positive("tune.min_steps", cfg.tune.min_steps)
    positive("tune.eval_tokens", cfg.tune.eval_tokens)
    for i, factor in enumerate(cfg.tune.space.lr):
        positive(f"tune.space.lr[{i}]", factor)
    for i, r in enumerate(cfg.tune.space.ranks):
        positive(f"tune.space.ranks[{i}]", r)
    positive("eval.temperature", cfg.eval.temperature, allow_zero=True)
    positive("eval.repetition_penalty", cfg.eval.repetition_penalty)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    if not 0 <= cfg.schedule.warmup < 1:
        raise ConfigError(f"config key 'schedule.warmup': must be in [0, 1), got {cfg.schedule.warmup}")
    if not 0 < cfg.schedule.decay <= 1:
        raise ConfigError(f"config key 'schedule.decay': must be in (0, 1], got {cfg.schedule.decay}")
    if cfg.schedule.name not in PROFILES:
        raise ConfigError(f"config key 'schedule.name': unknown schedule {cfg.schedule.name!r} (known: {', '.join(PROFILES)})")
    from .methods import METHODS
    from .optim import LAYERWISE, updates_in_backward

    if cfg.optim.layerwise and cfg.optim.name not in LAYERWISE:
        raise ConfigError(f"config key 'optim.layerwise': optimizer {cfg.optim.name!r} has no layer-wise mode "
                          f"(those that do: {', '.join(LAYERWISE)})")
    fused = "optim.name 'lomo'" if cfg.optim.name == "lomo" else "optim.layerwise"
    if updates_in_backward(cfg.optim) and cfg.train.grad_accum > 1:
        raise ConfigError(f"{fused} updates each weight during backward: it needs train.grad_accum 1")

    if cfg.train.fast_forward and not METHODS[cfg.method.name].adapter:
        raise ConfigError(f"config key 'train.fast_forward': Fast Forward is for adapter methods (lora, dora, ...), "
                          f"not {cfg.method.name!r}; set it to 0")
    if cfg.train.fast_forward and updates_in_backward(cfg.optim):
        raise ConfigError(f"config key 'train.fast_forward': needs the update of a whole step, which {fused} never holds")
    if updates_in_backward(cfg.optim) and METHODS[cfg.method.name].switches:
        raise ConfigError(f"{fused} cannot follow method {cfg.method.name!r}, which changes what trains; use adamw")
    for i, name in enumerate(cfg.tune.space.methods):
        if name not in METHODS:
            raise ConfigError(f"config key 'tune.space.methods[{i}]': unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    for i, name in enumerate(cfg.tune.space.optimizers):
        if name not in OPTIMIZERS:
            raise ConfigError(f"config key 'tune.space.optimizers[{i}]': unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"config key 'optim.name': unknown optimizer {cfg.optim.name!r} (known: {', '.join(OPTIMIZERS)})")
    _validate_fast_path(cfg)
    if cfg.checkpoint.background not in (True, False, "auto"):
        raise ConfigError(f"config key 'checkpoint.background': true, false or auto, got {cfg.checkpoint.background!r}")
    for key in ("eval.every", "checkpoint.every"):
        section, name = key.split(".")
        try:
            parse_interval(getattr(getattr(cfg, section), name))
        except ValueError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
    if cfg.model.init == "pretrained" and not cfg.model.name:
        raise ConfigError("config key 'model.name': required unless model.init is 'scratch' (a hub id or a local folder)")
    if cfg.model.init == "scratch" and not (cfg.model.preset or cfg.model.name or cfg.model.arch):
        raise ConfigError("model.init is 'scratch' but none of model.preset, model.name, model.arch says which architecture")
    if not cfg.data.train:
        raise ConfigError("config key 'data.train': required (files, folders or globs of training data)")
    positive("objective.beta", cfg.objective.beta)
    positive("objective.odds_weight", cfg.objective.odds_weight, allow_zero=True)
    positive("objective.gamma", cfg.objective.gamma, allow_zero=True)
    if cfg.objective.name != "sft" and cfg.data.select.method != "off":
        raise ConfigError(f"config key 'data.select.method': scores examples by next-token loss, not pairs for objective "
                          f"{cfg.objective.name!r}; set it to off")
    if cfg.objective.name != "sft" and cfg.train.fast_forward:
        raise ConfigError(f"config key 'train.fast_forward': judges repeats by held-out next-token loss, not by "
                          f"objective {cfg.objective.name!r}; set it to 0")
    _validate_data(cfg)
    from .quantize import check_config

    check_config(cfg, METHODS)  # model.quantize / method.init: loftq with a method that can run on a quantised base
    _validate_paths(cfg)


def _validate_fast_path(cfg: Config) -> None:
    """Attention, Liger, compile and precision settings (fastpath.py, attention.py)."""
    from .attention import KNOWN

    if cfg.model.attn_implementation not in KNOWN:
        raise ConfigError(f"config key 'model.attn_implementation': unknown implementation {cfg.model.attn_implementation!r} "
                          f"(known: {', '.join(KNOWN)})")
    for key, value in (("model.liger", cfg.model.liger), ("train.compile", cfg.train.compile)):
        if value not in (True, False, "auto"):
            raise ConfigError(f"config key '{key}': true, false or auto, got {value!r}")
    if cfg.train.precision == "pure-bf16":
        if cfg.model.dtype not in ("auto", "bfloat16"):
            raise ConfigError(f"config key 'model.dtype': {cfg.model.dtype} contradicts train.precision pure-bf16 "
                              "(bf16 weights); leave model.dtype at auto")
        if cfg.optim.name != "adamw":
            raise ConfigError(f"config key 'train.precision': pure-bf16 needs optim.name adamw (its Kahan-compensated "
                              f"bf16 variant); {cfg.optim.name!r} would round small updates away in bf16 weights")


def _validate_data(cfg: Config) -> None:
    """Mixture weights, dedup and selection settings."""
    d = cfg.data
    weights = []
    for i, source in enumerate(d.train):
        if not isinstance(source, SourceConfig):
            weights.append(None)
            continue
        if not source.path:
            raise ConfigError(f"config key 'data.train[{i}].path': required — this source (weight {source.weight}) names no files; "
                              "give it a path or remove it")
        if source.weight is not None and (not math.isfinite(source.weight) or source.weight < 0):
            raise ConfigError(f"config key 'data.train[{i}].weight': must be a number ≥ 0, got {source.weight!r}")
        weights.append(source.weight)
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        missing = weights.index(None)
        raise ConfigError(f"config key 'data.train[{missing}]': has no weight while other sources have one; "
                          "give every source a weight (share of training tokens), or none")
    if given and sum(given) <= 0:
        raise ConfigError("config key 'data.train': the source weights sum to 0; give at least one source a weight > 0")
    if d.replay and not 0 < d.replay_weight < 1:
        raise ConfigError(f"config key 'data.replay_weight': must be in (0, 1), got {d.replay_weight}")
    if not 0 < d.near_threshold < 1:
        raise ConfigError(f"config key 'data.near_threshold': must be in (0, 1), got {d.near_threshold}")
    sel = d.select
    if isinstance(sel.fraction, str):
        if sel.fraction != "auto":
            raise ConfigError(f"config key 'data.select.fraction': a number in (0, 1] or 'auto', got {sel.fraction!r}")
    elif not (math.isfinite(sel.fraction) and 0 < sel.fraction <= 1):
        raise ConfigError(f"config key 'data.select.fraction': must be in (0, 1] (or 'auto'), got {sel.fraction}")
    if sel.clusters < 0:
        raise ConfigError(f"config key 'data.select.clusters': must be ≥ 0, got {sel.clusters}")
    if sel.batch < 1:
        raise ConfigError(f"config key 'data.select.batch': must be ≥ 1, got {sel.batch}")
    if sel.target and sel.method != "rds":
        raise ConfigError(f"config key 'data.select.target': only data.select.method 'rds' uses target examples "
                          f"(method is {sel.method!r}); remove it or set the method to rds")


def _validate_paths(cfg: Config) -> None:
    """Paths that are empty or name the wrong kind of thing. An empty path would mean the
    current folder: all of it read as data, or used as the run folder."""
    for key in ("data.train", "data.eval", "data.replay", "data.select.target"):
        entries = cfg.data.select.target if key == "data.select.target" else getattr(cfg.data, key.split(".")[1])
        for i, entry in enumerate(entries):
            paths = entry.path if isinstance(entry, SourceConfig) else [entry]
            where = f"{key}[{i}].path" if isinstance(entry, SourceConfig) else f"{key}[{i}]"
            if any(not path.strip() for path in paths):
                raise ConfigError(f"config key '{where}': an empty path; name a file, folder or glob")
    if not cfg.output.dir.strip():
        raise ConfigError("config key 'output.dir': an empty path; name the folder for this run (e.g. runs/my-run)")
    if cfg.data.cache_dir is not None:
        if not cfg.data.cache_dir.strip():
            raise ConfigError("config key 'data.cache_dir': an empty path; name a folder or leave it unset (~/.cache/budgetune)")
        if os.path.exists(cfg.data.cache_dir) and not os.path.isdir(cfg.data.cache_dir):
            raise ConfigError(f"config key 'data.cache_dir': {cfg.data.cache_dir} is a file, not a folder; name a folder")


def parse_interval(value: Interval) -> tuple[str, float] | None:
    """`0.25` → ('progress', 0.25); `'5m'` → ('seconds', 300); `'auto'` → ('auto', 0); None/0 → None."""
    if value is None or value == 0:
        return None
    if value == "auto":  # resolved by the loop once it knows what an eval or a save costs (budget.py)
        return ("auto", 0.0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise ValueError(f"a number must be a fraction of the budget in (0, 1], got {value} (or give a duration like '5m')")
        return ("progress", float(value))
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must be > 0, got {value!r} (or 0 / null for never)")
    return ("seconds", seconds) if seconds > 0 else None


def expand_path(path: str) -> str:
    """`{stdlib}` → the Python standard library's folder; `~` → home."""
    return os.path.expanduser(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"]))


def builtin_config(name: str) -> Path | None:
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    return path if path.exists() else None


def parse_overrides(args: list[str]) -> dict:
    """['--budget.time', '90s', '--method.name=lora'] → {'budget': {'time': '90s'}, 'method': {'name': 'lora'}}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = _yaml_value(raw)
        _check_acyclic(value, f"--{key}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: '{part}' is not a section")
        node[parts[-1]] = value
    return out


# Besides YAMLError, PyYAML raises these: ValueError for impossible dates (2001-13-01),
# AttributeError for some explicit tags (!!timestamp x), RecursionError for deep nesting.
_YAML_VALUE_ERRORS = (ValueError, TypeError, AttributeError, RecursionError)


def _yaml_value(raw: str):
    """A command-line value parsed as YAML (`8` → 8, `[a, b]` → list); kept as the raw string
    when it is not valid YAML, so `--data.train 'x[1'` still means the path it says."""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, *_YAML_VALUE_ERRORS):
        return raw


def _check_acyclic(value, where: str, _seen: tuple = ()) -> None:
    """YAML aliases can build a list or mapping that contains itself; nothing in a config can use one."""
    if not isinstance(value, (dict, list)):
        return
    if any(value is seen for seen in _seen):
        raise ConfigError(f"{where}: a YAML alias (*name) refers to a mapping or list that contains it; write the value out")
    for item in value.values() if isinstance(value, dict) else value:
        _check_acyclic(item, where, _seen + (value,))


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        found = builtin_config(str(path))
        if found is None:
            raise ConfigError(f"config file {path} does not exist")
        path = found
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)") from None
    except _YAML_VALUE_ERRORS as e:  # PyYAML's other failures: see _yaml_value
        raise ConfigError(f"{path}: not valid YAML ({type(e).__name__}: {e}); fix the file") from None
    _check_acyclic(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, budget:, ...)")
    return data


def load_config(source: str | Path | dict | Config | None = None, overrides: dict | list[str] | None = None) -> Config:
    """A validated Config from a YAML path (or built-in name), a dict or a Config, plus overrides."""
    explicit: set[str] = set()
    if isinstance(source, Config):
        data = source.to_dict()
        explicit |= source.explicit
    elif isinstance(source, dict):
        data = dict(source)
    elif source is None:
        data = {}
    else:
        data = read_yaml(source)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    for layer in (data, overrides):  # `method: lora` is shorthand for `method: {name: lora}`
        if isinstance(layer.get("method"), str):
            layer["method"] = {"name": layer["method"]}
    if not isinstance(source, Config):
        explicit |= _dotted_keys(data)
    explicit |= _dotted_keys(overrides)
    data = merge(data, overrides)
    cfg = _build(Config, data, "")
    _validate(cfg)
    object.__setattr__(cfg, "_explicit", frozenset(explicit))
    return cfg


def _dotted_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        full = f"{prefix}{key}"
        keys.add(full)
        if isinstance(value, dict) and key != "arch":
            keys |= _dotted_keys(value, full + ".")
    return keys


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

