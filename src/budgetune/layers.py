"""The decoder layers of a causal LM, found the same way for every module that needs them: the planner
(plan/memory.py measures one layer), torch.compile of each layer (fastpath.py) and the methods that train some
layers at a time (LISA, BAdam, freeze).

Its own module at the ground floor, so that none of them imports another for it."""

from __future__ import annotations


def decoder_layers(model):
    """The model's `torch.nn.ModuleList` of `config.num_hidden_layers` decoder layers (a peft wrapper exposes the
    base config and modules too)."""
    import torch  # here, not at the top: the planner imports this module without needing torch yet

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"no list of {model.config.num_hidden_layers} decoder layers in {type(model).__name__}")
