"""Tied-LoRA (Renduchintala et al.): one A and one B per module type shared by all layers,
with per-layer trainable scaling vectors: ΔW_l = diag(v_l) · B · diag(u_l) · A · (α/r).

Ours: peft has VeRA (frozen random A, B) but not Tied-LoRA. The result is saved merged
(a plain transformers model), as no adapter format in peft can hold tied matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method_options import MethodOptions
from . import Method, register


@dataclass
class TiedLoraOptions(MethodOptions):
    name: str = "tied-lora"
    r: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                                               "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])


class TiedLoraLinear(nn.Module):
    """A frozen linear plus the tied low-rank update; `pair` holds the shared A and B."""

    def __init__(self, base: nn.Linear, pair: nn.ParameterDict, r: int, scaling: float):
        super().__init__()
        self.base = base
        self.pair = [pair]  # a list: the shared matrices are registered once, on the model, not per layer
        self.u = nn.Parameter(torch.ones(r, device=base.weight.device))
        self.v = nn.Parameter(torch.ones(base.out_features, device=base.weight.device))
        self.scaling = scaling

    def delta(self) -> torch.Tensor:
        a, b = self.pair[0]["A"], self.pair[0]["B"]
        return self.scaling * (self.v[:, None] * b) @ (self.u[:, None] * a)

    def forward(self, x):
        a, b = self.pair[0]["A"], self.pair[0]["B"]
        return self.base(x) + self.scaling * (((x @ a.T) * self.u) @ b.T) * self.v


@register
class TiedLora(Method):
    name = "tied-lora"
    Options = TiedLoraOptions
    adapter = True
    output = "model"  # saved merged: see module docstring
    Layer = TiedLoraLinear  # the wrapper whose delta() is folded in on saving (MoS reuses this class with its own)
    shared = "tied_lora"  # the model attribute holding the shared matrices

    def prepare(self, model, opts):
        model.requires_grad_(False)
        pairs = nn.ModuleDict()
        targets = set(opts.target_modules)
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name not in targets or not isinstance(child, nn.Linear):
                    continue
                key = f"{child_name}_{child.in_features}x{child.out_features}"
                if key not in pairs:
                    a = torch.empty(opts.r, child.in_features, device=child.weight.device)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    pairs[key] = nn.ParameterDict({"A": nn.Parameter(a), "B": nn.Parameter(torch.zeros(child.out_features, opts.r, device=a.device))})
                setattr(parent, child_name, TiedLoraLinear(child, pairs[key], opts.r, opts.alpha / opts.r))
        if not pairs:
            raise ValueError(f"tied-lora: none of {sorted(targets)} is a linear layer of this model")
        model.tied_lora = pairs
        return model

    def merged(self, model):
        with torch.no_grad():
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, self.Layer):
                        child.base.weight += child.delta().to(child.base.weight.dtype)
                        setattr(parent, child_name, child.base)
        delattr(model, self.shared)
        return model

    def save_pretrained(self, model, path) -> None:
        """The merged weights under the original names, without copying the model."""
        state = {}
        with torch.no_grad():
            wrapped = {name: m for name, m in model.named_modules() if isinstance(m, self.Layer)}
            for key, value in model.state_dict().items():
                owner = key.rsplit(".", 2)[0]  # "...q_proj" for "...q_proj.base.weight"
                if key.startswith(self.shared + ".") or (key.rsplit(".", 1)[0] in wrapped):
                    continue  # shared matrices and per-layer tensors: folded into the weights below
                if owner in wrapped and key.endswith(".base.weight"):
                    value = value + wrapped[owner].delta().to(value.dtype)
                state[key.replace(".base.", ".")] = value.contiguous()
        model.save_pretrained(str(path), state_dict=state, safe_serialization=True)
