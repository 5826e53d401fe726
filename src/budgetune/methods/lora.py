"""LoRA and its variants through peft: `W + (α/r)·B·A` on the chosen linear layers, base frozen.

Variants are presets of the same options, selectable by name:
  lora      plain LoRA
  rslora    rank-stabilised scaling α/√r (Kalajdzievski)
  dora      weight-decomposed LoRA: magnitude and direction (Liu et al.)
  loraplus  LoRA with B trained at `plus_ratio` × the learning rate of A (Hayou et al.)
  pissa     A, B initialised from the top-r singular triplets of W, the residual frozen (Meng et al.)
peft implements the layers; budgetune only configures them (and LoRA+'s optimizer groups).
A PiSSA adapter is saved converted to a plain rank-2r LoRA of the *original* weights (peft's
conversion), so it loads on the unmodified base model like any other adapter.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..method_options import MethodOptions
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
    init: str = "default"  # "default" (B = 0), "pissa" / "pissa_niter_N" (fast randomised SVD, N iterations), or "loftq" (quantised base: Q(W) + BA ≈ W)


@register
class Lora(Method):
    name = "lora"
    Options = LoraOptions
    adapter = True
    output = "adapter"
    quantized_base = True  # peft's LoRA/DoRA layers wrap bitsandbytes 4-/8-bit linears

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
            init_lora_weights=True if opts.init in ("default", "loftq") else opts.init,  # loftq: set after wrapping
            task_type="CAUSAL_LM",
        )

    def prepare(self, model, opts):
        from peft import get_peft_model

        model = get_peft_model(model, self.peft_config(opts))
        from ..quantize import is_quantized, loftq_init

        if opts.init == "loftq" and is_quantized(model.get_base_model()):  # (the planner prepares float meta-device models)
            loftq_init(model)
        return model

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


@dataclass
class PissaOptions(LoraOptions):
    name: str = "pissa"
    init: str = "pissa_niter_16"  # randomised SVD: seconds instead of minutes on 7B-sized matrices


@register
class Pissa(Lora):
    name = "pissa"
    Options = PissaOptions
    quantized_base = False  # peft's PiSSA rewrites the base weights, which it does only on float weights

    def prepare(self, model, opts):
        if not opts.init.startswith("pissa"):
            from ..errors import ConfigError

            raise ConfigError(f"config key 'method.init': method 'pissa' needs a pissa init, not {opts.init!r}")
        model = super().prepare(model, opts)
        # the adapter as initialised: saving needs it to express the result against the original W
        # (the SVD is seeded, so a resumed run recomputes the same one)
        model._pissa_init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    def save_pretrained(self, model, path: Path) -> None:
        holder = Path(tempfile.mkdtemp(prefix=".tmp-pissa-", dir=Path(path).parent))
        init_dir = holder / "pissa_init"  # peft loads it as an adapter by this (dot-free) name
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        named = dict(model.named_parameters())
        try:
            with torch.no_grad():  # write the initial adapter, then put the trained one back
                for n, t in model._pissa_init.items():
                    named[n].copy_(t)
                model.save_pretrained(str(init_dir), safe_serialization=True)
                for n, t in trained.items():
                    named[n].copy_(t)
            model.save_pretrained(str(path), safe_serialization=True, path_initial_model_for_weight_conversion=str(init_dir))
        finally:
            shutil.rmtree(holder, ignore_errors=True)
