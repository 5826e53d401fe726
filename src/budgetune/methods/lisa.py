"""LISA: layerwise importance-sampled AdamW (Pan et al.).

Ours: no library implements it. The embeddings, the LM head and the final norm always
train; every `interval` optimizer steps, `layers` of the decoder layers are drawn
uniformly (seeded by the period, so a resumed run draws the same) and only they train.
The loop rebuilds the optimizer on each switch, so optimizer state exists only for the
active layers and is dropped when they change. Checkpoints hold every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import decoder_layers
from ..method_options import MethodOptions
from . import Method, register


@dataclass
class LisaOptions(MethodOptions):
    name: str = "lisa"
    layers: int = 2  # γ: decoder layers trained at a time
    interval: int = 20  # K: optimizer steps between samples
    seed: int = 0


def active_layers(n_layers: int, opts: LisaOptions, step: int) -> list[int]:
    period = step // opts.interval
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + period)
    return sorted(torch.randperm(n_layers, generator=gen)[: min(opts.layers, n_layers)].tolist())


@register
class Lisa(Method):
    name = "lisa"
    Options = LisaOptions
    switches = True

    def prepare(self, model, opts):
        model.requires_grad_(True)
        self._active = None
        return model

    def select(self, model, opts, step: int) -> bool:
        layers = decoder_layers(model)
        chosen = active_layers(len(layers), opts, step)
        if chosen == getattr(self, "_active", None):
            return False
        for i, layer in enumerate(layers):
            layer.requires_grad_(i in chosen)
        self._active = chosen
        return True

    def saved_parameters(self, model) -> dict:
        return dict(model.named_parameters())
