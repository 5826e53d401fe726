"""Which attention implementation a run uses on packed rows.

Packed rows carry `position_ids` that restart at every example and no attention mask
(data/packing.py). transformers turns that into:
- `flash_attention_2`: flash-attn's varlen kernel with the examples' boundaries (cu_seqlens)
  read off the position_ids — no [T, T] mask at all;
- `flex_attention`: PyTorch FlexAttention with a document block mask (a few bytes per
  128 × 128 block) — no dense mask either;
- `sdpa` / `eager`: a dense [B, 1, T, T] block-diagonal mask, converted to float in every
  layer (O(T²) memory, and SDPA cannot use its flash kernel with a mask).

`model.attn_implementation: auto` picks the first of those that runs here: flash-attn varlen
when the `flash_attn` package is importable and the device is CUDA, else FlexAttention on
CUDA, else SDPA with the mask. The kernels are transformers' and flash-attn's; this module
only chooses, and refuses choices that cannot train on the device.
"""

from __future__ import annotations

import importlib.util

from .errors import ConfigError

KNOWN = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
MASK_FREE = ("flash_attention_2", "flex_attention")  # no dense [T, T] mask on packed rows


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (torch ≥ 2.5)
    except ImportError:
        return False
    return True


def resolve(requested: str, device_type: str, training: bool = True) -> str:
    """The implementation to load the model with, for `model.attn_implementation` on a device.

    `training=False` (evaluating, planning for another machine) allows FlexAttention on the
    CPU, which torch runs forward only."""
    if requested not in KNOWN:
        raise ConfigError(f"config key 'model.attn_implementation': unknown implementation {requested!r} "
                          f"(known: {', '.join(KNOWN)})")
    cuda = device_type == "cuda"
    if requested == "auto":
        if cuda and flash_attn_installed():
            return "flash_attention_2"
        if cuda and flex_attention_available():
            return "flex_attention"
        return "sdpa"
    if requested == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise ConfigError("config key 'model.attn_implementation': flash_attention_2 needs a CUDA GPU and the flash_attn "
                          "package (pip install flash-attn --no-build-isolation); use auto to pick what runs here")
    if requested == "flex_attention" and training and not cuda:
        # torch 2.13: "FlexAttention does not support backward on CPU"
        raise ConfigError("config key 'model.attn_implementation': flex_attention has no backward pass on the CPU; "
                          "use auto (sdpa here) or sdpa")
    return requested


def describe(name: str) -> str:
    """One line for the log: what the packed rows get."""
    return {
        "flash_attention_2": "flash-attn varlen (example boundaries from position_ids, no mask)",
        "flex_attention": "FlexAttention document masking (block mask, no dense mask)",
        "sdpa": "SDPA with a block-diagonal [T, T] mask",
        "eager": "eager attention with a block-diagonal [T, T] mask",
    }.get(name, name)
