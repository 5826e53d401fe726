"""AdamW with FP8 optimizer states (COAT, Xi et al.: Dynamic Range Expansion).

Ours: no library stores Adam moments in float8 with range expansion (bitsandbytes' 8-bit
Adam uses blockwise int8 with a dynamic quantisation map, a different scheme).

Each moment tensor is split into groups of `group_size` elements. Per group, the values
are expanded as x → sign(x)·|x|^k, with k chosen so the group's dynamic range
max|x| / min|x| matches E4M3's (448 / 2^-9), then scaled by s = max|f(x)| / 448 and stored
as float8_e4m3fn. k and s are kept per group in fp32. Dequantisation inverts both:
x = sign(y)·|y|^(1/k), y = q·s; each nonzero element keeps a relative error of at most
(1 + 2^-4)^(1/k) − 1. Per element: 1 byte per moment plus 8 bytes per 256-element group,
so the states take (2 + 2·8/256) / 8 ≈ 25.8% of fp32 AdamW's.

The update itself runs in fp32 one parameter at a time: dequantise m and v, apply AdamW,
quantise them back.
"""

from __future__ import annotations

import math

import torch

from . import register
from .base import PerParameterOptimizer, adam_direction, decoupled_decay

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN = 2.0**-6  # smallest normal E4M3 value: mapping the range onto normals keeps every element's 3 mantissa bits
FP8_RANGE = math.log(FP8_MAX / FP8_MIN)


def quantize(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 codes shaped [groups, group_size], per-group scale, per-group exponent k)."""
    flat = x.detach().float().flatten()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, group_size)
    a = g.abs()
    amax = a.amax(1)
    amin = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(1)
    amin = torch.where(torch.isfinite(amin), amin, amax)
    ratio = (amax / amin.clamp_min(1e-38)).clamp_min(1.0)
    # k maps the group's range onto FP8's; a constant group (ratio 1) needs no expansion
    k = torch.where(ratio > 1.0 + 1e-6, FP8_RANGE / torch.log(ratio), torch.ones_like(ratio)).clamp(0.05, 8.0)
    expanded = torch.sign(g) * a.pow(k[:, None])
    scale = expanded.abs().amax(1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (expanded / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale, k


def dequantize(codes: torch.Tensor, scale: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = codes.float() * scale[:, None]
    x = torch.sign(y) * y.abs().pow(1.0 / k[:, None])
    return x.flatten()[: like.numel()].view_as(like)


class FP8AdamW(PerParameterOptimizer):
    """AdamW whose first and second moments are stored in FP8 with dynamic range expansion."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, group_size=256):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, group_size=group_size))

    def load_state_dict(self, state_dict):
        # torch casts floating state to the parameter's dtype on load; fp8 → fp32 → fp8 is
        # exact, so cast the codes back instead of keeping 4× the memory
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("m_q", "v_q"):
                if key in state:
                    state[key] = state[key].to(FP8)

    def _load(self, state, key, p):
        return dequantize(state[f"{key}_q"], state[f"{key}_scale"], state[f"{key}_k"], p)

    def _store(self, state, key, value, group_size):
        state[f"{key}_q"], state[f"{key}_scale"], state[f"{key}_k"] = quantize(value, group_size)

    def update(self, p, grad, state, group, index):
        if "m_q" in state:
            m, v = self._load(state, "m", grad), self._load(state, "v", grad)
        else:
            m, v = torch.zeros_like(grad), torch.zeros_like(grad)
        state["step"] += 1
        direction = adam_direction(m, v, grad, group, int(state["step"].item()))
        decoupled_decay(p, group)
        p.add_(direction.to(p.dtype), alpha=-group["lr"])
        self._store(state, "m", m, group["group_size"])
        self._store(state, "v", v, group["group_size"])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (for comparisons with fp32 AdamW)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


@register("adamw_fp8")
def adamw_fp8(groups, cfg):
    return FP8AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
