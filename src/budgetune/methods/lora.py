"""LoRA and its variants through peft: `W + (α/r)·B·A` on the chosen linear layers, base frozen.

Variants are presets of the same options, selectable by name:
  lora      plain LoRA
  rslora    rank-stabilised scaling α/√r (Kalajdzievski)
  dora      weight-decomposed LoRA: magnitude and direction (Liu et al.)
  loraplus  LoRA with B trained at `plus_ratio` × the learning rate of A (Hayou et al.)
peft implements the layers; budgetune only configures them (and LoRA+'s optimizer groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import MethodOptions
from . import Method, register


@dataclass
class LoraOptions(MethodOptions):
    name: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False  # scale by α/√r instead of α/r
    dora: bool = False  # decompose into magnitude and direction
    plus_ratio: float = 1.0  # LoRA+: learning-rate ratio of B over A (≈16 in the paper); 1 = plain


@register
class Lora(Method):
    name = "lora"
    Options = LoraOptions
    adapter = True
    output = "adapter"

    def peft_config(self, opts):
        from peft import LoraConfig

        targets = opts.target_modules
        return LoraConfig(
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            use_rslora=opts.rslora,
            use_dora=opts.dora,
            task_type="CAUSAL_LM",
        )

    def prepare(self, model, opts):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(opts))

    def lr_scales(self, opts) -> dict[str, float]:
        return {"lora_B": opts.plus_ratio} if opts.plus_ratio != 1.0 else {}

    def merged(self, model):
        return model.merge_and_unload()


@dataclass
class RsLoraOptions(LoraOptions):
    name: str = "rslora"
    rslora: bool = True


@register
class RsLora(Lora):
    name = "rslora"
    Options = RsLoraOptions


@dataclass
class DoraOptions(LoraOptions):
    name: str = "dora"
    dora: bool = True


@register
class Dora(Lora):
    name = "dora"
    Options = DoraOptions


@dataclass
class LoraPlusOptions(LoraOptions):
    name: str = "loraplus"
    plus_ratio: float = 16.0


@register
class LoraPlus(Lora):
    name = "loraplus"
    Options = LoraPlusOptions
