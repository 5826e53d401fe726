"""Freeze-tuning: only the top `layers` decoder layers (and the final norm) train.

Ours (a few lines, no library needed). The frozen lower layers run without building an
autograd graph, so their activations are not kept either: memory falls with both the
optimizer state and the activations. `head: true` trains the LM head too (with tied
embeddings that is the embedding matrix as well).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layers import decoder_layers
from ..method_options import MethodOptions
from . import Method, register


@dataclass
class FreezeOptions(MethodOptions):
    name: str = "freeze"
    layers: int = 2  # top decoder layers that train
    head: bool = False  # also train the LM head


def final_norm(model):
    """The norm after the last decoder layer (`model.norm`, `final_layer_norm`, `ln_f`...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "final_layer_norm", "ln_f"):
        if hasattr(base, name):
            return getattr(base, name)
    return None


@register
class Freeze(Method):
    name = "freeze"
    Options = FreezeOptions

    def prepare(self, model, opts):
        layers = decoder_layers(model)
        if not 1 <= opts.layers <= len(layers):
            from ..errors import ConfigError

            raise ConfigError(f"config key 'method.layers': {opts.layers} is not between 1 and the model's {len(layers)} layers")
        model.requires_grad_(False)
        for layer in layers[len(layers) - opts.layers:]:
            layer.requires_grad_(True)
        norm = final_norm(model)
        if norm is not None:
            norm.requires_grad_(True)
        if opts.head:
            model.get_output_embeddings().requires_grad_(True)
        return model
