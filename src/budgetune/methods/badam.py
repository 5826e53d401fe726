"""BAdam: block coordinate descent with Adam (Luo et al.) — one decoder layer trains at a time.

Ours, not the `badam` package: its BlockOptimizer wraps the optimizer and owns the switching
(it flips requires_grad, keeps its own fp32 copies and step counter, and draws random orders
from Python's global `random`), which duplicates what our loop already does for LISA and
cannot resume exactly. Here BAdam is a switching method like LISA: every `interval` optimizer
steps the active block changes, the loop rebuilds the optimizer, so Adam's state exists for
the active block only and is dropped on a switch (as in the paper). Blocks are the decoder
layers; embeddings, head and final norm stay frozen (the package's default). Orders:
  ascending / descending  layer 0 → L−1, or L−1 → 0, cyclically
  random                  a fresh seeded permutation of the layers every L periods (random
                          reshuffling: each layer once per epoch of blocks)
The active block is a function of the step alone, so a resumed run picks the same one.
Checkpoints hold every weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..layers import decoder_layers
from ..method_options import MethodOptions
from . import Method, register


@dataclass
class BadamOptions(MethodOptions):
    name: str = "badam"
    interval: int = 50  # K: optimizer steps between block switches
    order: Literal["ascending", "descending", "random"] = "descending"  # how the next block is chosen (descending: the paper's default)
    seed: int = 0  # random order: seeds each epoch's permutation


def active_block(n_layers: int, opts: BadamOptions, step: int) -> int:
    period = step // max(1, opts.interval)
    epoch, position = divmod(period, n_layers)
    if opts.order == "ascending":
        return position
    if opts.order == "descending":
        return n_layers - 1 - position
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch)
    return int(torch.randperm(n_layers, generator=gen, device="cpu")[position])  # cpu: also under a meta-device context (the planner)


@register
class Badam(Method):
    name = "badam"
    Options = BadamOptions
    switches = True

    def prepare(self, model, opts):
        if opts.interval < 1:
            from ..errors import ConfigError

            raise ConfigError(f"config key 'method.interval': steps between block switches, at least 1, got {opts.interval}")
        model.requires_grad_(False)
        self._active = None
        self.select(model, opts, 0)  # the first block (what the planner's counts see); the loop selects again on resume
        return model

    def select(self, model, opts, step: int) -> bool:
        layers = decoder_layers(model)
        block = active_block(len(layers), opts, step)
        if block == getattr(self, "_active", None):
            return False
        model.requires_grad_(False)
        layers[block].requires_grad_(True)
        self._active = block
        return True

    def saved_parameters(self, model) -> dict:
        return dict(model.named_parameters())
