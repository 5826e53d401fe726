"""MoS, Mixture of Shards (Wang et al.): LoRA matrices assembled from shards of a global pool.

Ours: no library implements it. Per module type (e.g. every q_proj), a pool shared by all
layers holds `pool_rank × layers` rank vectors for A and as many for B, each cut into
`shards` equal pieces (vector sharding). Layer l's rank-r adapter ΔW_l = (α/r)·B_l·A_l is
assembled, not stored:
  - the first `private` rank vectors of A_l and B_l are the layer's own (shard privatization);
  - the other (r − private) vectors are concatenations of `shards` pool pieces picked by fixed
    routing indices, drawn once from a seed (subset selection; distinct pieces while the pool
    has enough), independently for A and B (pair dissociation).
Trainable parameters per module type: (pool_rank + private) × layers × (in + out) — a LoRA
of rank pool_rank + private — while every layer's adapter has rank r. Defaults: r 16 from an
equivalent rank 2, the 8× saving the paper reports at equal quality. The routing is a pure
function of the seed (rebuilt identically on resume, not saved). Saved merged, as Tied-LoRA
(no peft format holds shared shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method_options import MethodOptions
from . import register
from .tied_lora import TiedLora


@dataclass
class MosOptions(MethodOptions):
    name: str = "mos"
    r: int = 16  # rank of each layer's assembled adapter
    pool_rank: int = 1  # shared pool per module type: pool_rank × layers rank vectors (for A and for B)
    private: int = 1  # rank vectors per layer that are its own (≤ r)
    shards: int = 4  # pieces each rank vector is cut into; in/out features must divide by it
    alpha: float = 32.0
    seed: int = 0  # routing indices
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                                               "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])


def _cut(n: int, dim: int, k: int, device) -> nn.Parameter:
    """n rank vectors of length dim as n·k shards of length dim/k, LoRA's A init (uniform ±1/√dim)."""
    bound = 1 / math.sqrt(dim)
    return nn.Parameter(torch.empty(n * k, dim // k, device=device).uniform_(-bound, bound))


def routing(pool_shards: int, slots: int, gen: torch.Generator) -> torch.Tensor:
    """`slots` pool indices: distinct while the pool has enough, otherwise each pass a fresh permutation."""
    if slots == 0:
        return torch.zeros(0, dtype=torch.long, device="cpu")
    passes = -(-slots // pool_shards)
    return torch.cat([torch.randperm(pool_shards, generator=gen, device="cpu") for _ in range(passes)])[:slots]


class MosLinear(nn.Module):
    """A frozen linear plus the MoS update; `pool` holds the module type's shared shards."""

    def __init__(self, base: nn.Linear, pool: nn.ParameterDict, opts: MosOptions, gen: torch.Generator):
        super().__init__()
        k, device = opts.shards, base.weight.device
        self.base, self.pool, self.r, self.k = base, [pool], opts.r, k  # a list: the pool is registered once, on the model
        self.scaling = opts.alpha / opts.r
        self.private_a = _cut(opts.private, base.in_features, k, device)
        self.private_b = nn.Parameter(torch.zeros(opts.private * k, base.out_features // k, device=device))
        shared_slots = (opts.r - opts.private) * k
        self.register_buffer("index_a", routing(pool["A"].shape[0], shared_slots, gen).to(device), persistent=False)
        self.register_buffer("index_b", routing(pool["B"].shape[0], shared_slots, gen).to(device), persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool[0]
        a = torch.cat([self.private_a, pool["A"][self.index_a]]).reshape(self.r, -1)  # r × in
        b = torch.cat([self.private_b, pool["B"][self.index_b]]).reshape(self.r, -1).T  # out × r
        return a, b

    def delta(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * b @ a

    def forward(self, x):
        a, b = self.factors()
        return self.base(x) + self.scaling * ((x @ a.T) @ b.T)


@register
class Mos(TiedLora):
    name = "mos"
    Options = MosOptions
    Layer = MosLinear
    shared = "mos_pools"

    def prepare(self, model, opts):
        from ..errors import ConfigError

        if not 0 <= opts.private <= opts.r or opts.pool_rank < 0 or opts.pool_rank + opts.private < 1:
            raise ConfigError(f"config keys 'method.private', 'method.pool_rank': need 0 ≤ private ≤ r ({opts.r}) and "
                              f"pool_rank + private ≥ 1, got private {opts.private}, pool_rank {opts.pool_rank}")
        if opts.private < opts.r and opts.pool_rank < 1:
            raise ConfigError("config key 'method.pool_rank': the shared vectors (r − private) need a pool of at least 1")
        model.requires_grad_(False)
        targets, found = set(opts.target_modules), []
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    found.append((parent, child_name, child))
        if not found:
            raise ConfigError(f"mos: none of {sorted(targets)} is a linear layer of this model")
        for _, _, child in found:
            for side in (child.in_features, child.out_features):
                if side % opts.shards:
                    raise ConfigError(f"config key 'method.shards': {side} features of a {child.in_features}×{child.out_features} "
                                      f"linear do not divide into {opts.shards} shards; choose a divisor")
        kinds: dict[str, int] = {}
        for _, name, child in found:
            key = f"{name}_{child.in_features}x{child.out_features}"
            kinds[key] = kinds.get(key, 0) + 1
        pools = nn.ModuleDict()
        for key, layers in kinds.items():
            fan_in, fan_out = (int(v) for v in key.rsplit("_", 1)[1].split("x"))
            device = next(c.weight.device for _, n, c in found if f"{n}_{c.in_features}x{c.out_features}" == key)
            pools[key] = nn.ParameterDict({"A": _cut(opts.pool_rank * layers, fan_in, opts.shards, device),
                                           "B": nn.Parameter(torch.zeros(opts.pool_rank * layers * opts.shards, fan_out // opts.shards,
                                                                         device=device))})
        for ordinal, (parent, name, child) in enumerate(found):
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + ordinal)
            key = f"{name}_{child.in_features}x{child.out_features}"
            setattr(parent, name, MosLinear(child, pools[key], opts, gen))
        model.mos_pools = pools
        return model
