"""AdaLoRA: LoRA whose rank budget moves to the matrices that matter (Zhang et al.), via peft.

peft implements the SVD-form adapter ΔW = P Λ Q, the importance scores (smoothed
sensitivity × uncertainty) and the cubic budget schedule. Ours is the wiring:

- The schedule runs on budget progress, not on a step count guessed in advance: peft sees a
  virtual timeline of TICKS steps and each optimizer step reports `progress × TICKS`, so the
  warmup (`tinit`), the pruning and the final fixed-rank phase (`tfinal`) are fractions of
  the budget and the final allocation happens exactly once, whatever the step count.
- The orthogonality regulariser ‖PᵀP − I‖ + ‖QQᵀ − I‖ (peft adds it only to a loss computed
  from labels, which our loss is not) is returned by `regularizer` and added by the loop.
- The importance estimates and the rank pattern go into checkpoints: resume is exact.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..method_options import MethodOptions
from . import register
from .peft_tuners import PeftTuner

TICKS = 10_000  # resolution of the virtual timeline peft schedules on


@dataclass
class AdaLoraOptions(MethodOptions):
    name: str = "adalora"
    init_r: int = 12  # rank every matrix starts with
    target_r: int = 8  # average rank after pruning (total budget = target_r × matrices)
    tinit: float = 0.1  # fraction of the budget before pruning starts
    tfinal: float = 0.2  # fraction of the budget at the end with ranks fixed
    alpha: float = 32.0
    dropout: float = 0.0
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of the uncertainty
    orth_reg_weight: float = 0.5
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@register
class AdaLora(PeftTuner):
    name = "adalora"
    Options = AdaLoraOptions

    def peft_config(self, opts):
        from peft import AdaLoraConfig

        if not 0 <= opts.tinit and 0 <= opts.tfinal and opts.tinit + opts.tfinal < 1:
            from ..errors import ConfigError

            raise ConfigError("config keys 'method.tinit' and 'method.tfinal': fractions of the budget with tinit + tfinal < 1, "
                              f"got {opts.tinit} and {opts.tfinal}")
        if not 1 <= opts.target_r <= opts.init_r:
            from ..errors import ConfigError

            raise ConfigError(f"config key 'method.target_r': must be between 1 and method.init_r ({opts.init_r}), got {opts.target_r}")
        targets = opts.target_modules
        return AdaLoraConfig(
            init_r=opts.init_r, target_r=opts.target_r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
            tinit=int(opts.tinit * TICKS), tfinal=int(opts.tfinal * TICKS), deltaT=1, total_step=TICKS,
            beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.orth_reg_weight,
            target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        )

    def prepare(self, model, opts):
        model = super().prepare(model, opts)
        model._adalora_final = False  # whether the final rank allocation has been made
        return model

    @staticmethod
    def _tuner(model):
        return model.base_model

    def save_pretrained(self, model, path: Path) -> None:
        with unsharded_save():
            super().save_pretrained(model, path)

    def after_update(self, model, opts, progress: float) -> None:
        tuner = self._tuner(model)
        config = tuner.peft_config[tuner.trainable_adapter_name]
        boundary = config.total_step - config.tfinal
        tick = min(config.total_step, int(progress * config.total_step))
        if tick < boundary:
            tuner.update_and_allocate(tick)
        elif not model._adalora_final:  # peft fixes the final ranks at exactly this step, once
            if not tuner.rankallocator.exp_avg_ipt:  # a budget of a step or two: no importance scored yet
                tuner.rankallocator.update_ipt(tuner.model)
            tuner.update_and_allocate(boundary)
            model._adalora_final = True
        else:
            tuner.update_and_allocate(max(tick, boundary + 1))  # keep the pruned triplets at zero

    def regularizer(self, model):
        """AdaLoRA's orthogonality penalty, averaged over the adapter's P and Q matrices."""
        tuner = self._tuner(model)
        weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
        if not weight:
            return None
        total, count = 0.0, 0
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                gram = p @ p.T if "lora_A" in name else p.T @ p
                total = total + torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype))
                count += 1
        return weight * total / max(count, 1)

    def state_dict(self, model) -> tuple[dict, dict]:
        tuner = self._tuner(model)
        allocator = tuner.rankallocator
        tensors = {f"{kind}/{n}": t for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for n, t in getattr(allocator, kind).items()}
        config = tuner.peft_config[tuner.trainable_adapter_name]
        return tensors, {"final": model._adalora_final, "rank_pattern": config.rank_pattern}

    def load_state_dict(self, model, tensors: dict, info: dict) -> None:
        tuner = self._tuner(model)
        allocator = tuner.rankallocator
        allocator.reset_ipt()
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = t.to(next(model.parameters()).device)
        model._adalora_final = info.get("final", False)
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = info.get("rank_pattern")


# peft warns on any zero-sized lora_A / lora_B that it saves: under ZeRO-3 / FSDP a sign of shards
# not gathered, but AdaLoRA's final allocation legitimately prunes some matrices to rank 0
_NOT_GATHERED = r".*DeepSpeed ZeRO-3 / FSDP shards were not gathered"


@contextlib.contextmanager
def unsharded_save():
    """Silence peft's "shards were not gathered" warning where no shard exists: a single
    process holds every parameter whole. With several processes the warning stays."""
    import torch.distributed as dist

    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            warnings.filterwarnings("ignore", message=_NOT_GATHERED)
        yield
