"""LoRA through peft: `W + (α/r)·B·A` on the chosen linear layers, base frozen."""

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


@register
class Lora(Method):
    name = "lora"
    Options = LoraOptions
    adapter = True

    def peft_config(self, opts):
        from peft import LoraConfig

        targets = opts.target_modules
        return LoraConfig(
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            use_rslora=opts.rslora,
            task_type="CAUSAL_LM",
        )

    def prepare(self, model, opts):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(opts))

    def merged(self, model):
        return model.merge_and_unload()
