"""Other peft adapters, configured here and implemented by peft: IA3, VeRA, MiSS.

- ia3:  learned rescaling vectors on keys, values and the feed-forward input (Liu et al.).
- vera: frozen random shared A/B with trained per-layer scaling vectors (Kopiczko et al.).
- miss: MiSS (formerly Bone) shard-sharing block adapters.

`target_modules` left empty lets peft pick its per-architecture defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method_options import MethodOptions
from . import Method, register


class PeftTuner(Method):
    """A peft adapter method: `peft_config(opts)` is all a subclass provides."""

    adapter = True
    output = "adapter"
    quantized_base = True  # peft has bitsandbytes layers for IA3, VeRA, MiSS and AdaLoRA (checked on the CPU)

    def peft_config(self, opts):
        raise NotImplementedError

    def prepare(self, model, opts):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(opts))

    def merged(self, model):
        return model.merge_and_unload()


def _targets(opts):
    return opts.target_modules or None


@dataclass
class IA3Options(MethodOptions):
    name: str = "ia3"
    target_modules: list[str] = field(default_factory=list)
    feedforward_modules: list[str] = field(default_factory=list)


@register
class IA3(PeftTuner):
    name = "ia3"
    Options = IA3Options

    def peft_config(self, opts):
        from peft import IA3Config

        return IA3Config(target_modules=_targets(opts), feedforward_modules=opts.feedforward_modules or None, task_type="CAUSAL_LM")


@dataclass
class VeraOptions(MethodOptions):
    name: str = "vera"
    r: int = 256
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


@register
class Vera(PeftTuner):
    name = "vera"
    Options = VeraOptions

    def peft_config(self, opts):
        from peft import VeraConfig

        return VeraConfig(r=opts.r, vera_dropout=opts.dropout, target_modules=_targets(opts), task_type="CAUSAL_LM")


@dataclass
class MissOptions(MethodOptions):
    name: str = "miss"
    r: int = 64
    target_modules: list[str] = field(default_factory=list)


@register
class Miss(PeftTuner):
    name = "miss"
    Options = MissOptions

    def peft_config(self, opts):
        from peft import MissConfig

        return MissConfig(r=opts.r, target_modules=_targets(opts), task_type="CAUSAL_LM")
