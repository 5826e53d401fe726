"""The GPU fast path: precision, Liger kernels and torch.compile, each chosen by device.

- `train.precision`: fp32 (CPU default), bf16-mixed (bf16 autocast over fp32 master
  weights: accelerate's `mixed_precision="bf16"`; the GPU default), pure-bf16 (weights,
  gradients and AdamW states all bf16; the update is Kahan-compensated by torch-optimi's
  AdamW, so small updates are not rounded away — optim/__init__.py picks it for bf16 weights).
- `model.liger`: Liger Kernel's Triton kernels (RMSNorm, SwiGLU, RoPE patched into the model
  by Liger's own `_apply_liger_kernel_to_instance`, and its fused linear + cross-entropy used
  by lm_loss.token_losses), on CUDA when the `liger-kernel` package is installed; otherwise
  our chunked head + loss (lm_loss.py).
- `train.compile`: torch.compile of each decoder layer in place (`Module.compile`: the
  module keeps its parameter names, so checkpoints and saved models are unchanged; the head
  and the loss stay eager, where lm_loss.token_losses swaps the head for the chunked loss).

Nothing here imports a CUDA-only package unless the device is CUDA and it is asked for.
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import ConfigError
from .layers import decoder_layers

PRECISIONS = ("auto", "fp32", "bf16-mixed", "pure-bf16")
COMPILE_MIN_BUDGET_S = 600  # auto: compiling a 0.5-1.5B model costs about a minute; not worth it on shorter runs


def resolve_precision(cfg, device_type: str) -> str:
    """fp32, bf16-mixed or pure-bf16 for `train.precision` on a device."""
    asked = cfg.train.precision
    cuda = device_type == "cuda"
    bf16_ok = cuda and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())  # planning for another machine: assume it
    if asked == "auto":
        return "bf16-mixed" if bf16_ok and cfg.model.dtype in ("auto", "bfloat16") else "fp32"
    if asked == "bf16-mixed" and not bf16_ok:
        raise ConfigError("config key 'train.precision': bf16-mixed (bf16 autocast) needs a GPU with bf16; "
                          "use auto (fp32 on the CPU) or pure-bf16")
    return asked


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(cfg, device_type: str) -> bool:
    """Whether Liger's kernels run: `model.liger` auto → on CUDA when installed; true → required."""
    asked = cfg.model.liger
    if asked is False:
        return False
    runs = device_type == "cuda" and liger_installed()
    if asked is True and not runs:
        raise ConfigError("config key 'model.liger': Liger Kernel needs a CUDA GPU and the liger-kernel package "
                          "(pip install 'budgetune[liger]'); use auto to fall back to the chunked loss")
    return runs


def apply_liger(model, cfg, device_type: str) -> list[str]:
    """Patch Liger's RMSNorm, SwiGLU and RoPE kernels into `model` (before any adapter wraps it) and
    attach its fused linear + cross-entropy to the LM head for lm_loss.token_losses. The kernels
    applied; [] when Liger does not run here."""
    if not use_liger(cfg, device_type):
        return []
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # Liger's own instance patcher knows which modules each architecture has; the loss is ours to call
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    attach_fused_loss(model, LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum"))
    return ["rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"]


def attach_fused_loss(model, loss_fn) -> None:
    """`loss_fn(weight, hidden [N, H], targets [N], bias) → summed loss`, used by lm_loss.token_losses
    in place of the head + cross-entropy. Kept as a plain attribute of the head (not a submodule:
    nothing changes in the state dict or the saved model)."""
    head = model.get_output_embeddings()
    object.__setattr__(head, "budgetune_fused_loss", loss_fn)


def fused_loss(head):
    return getattr(head, "budgetune_fused_loss", None)


def use_compile(cfg, device_type: str) -> bool:
    """`train.compile`: true / false, or auto — on a GPU, for an unquantised model, when no time
    budget shorter than COMPILE_MIN_BUDGET_S makes the compile time count."""
    asked = cfg.train.compile
    if asked != "auto":
        return bool(asked)
    if device_type != "cuda" or cfg.model.quantize:
        return False
    from .units import parse_duration

    return cfg.budget.time is None or parse_duration(cfg.budget.time) >= COMPILE_MIN_BUDGET_S


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place; the number compiled. Identical layers share one
    compiled graph, so the compile time is that of one layer, not of the whole stack."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def describe(cfg, device_type: str, attention: str) -> str:
    """One line for the log: what the fast path picked here."""
    from .attention import describe as attention_words

    parts = [f"attention: {attention_words(attention)}", f"precision {resolve_precision(cfg, device_type)}",
             "Liger kernels" if use_liger(cfg, device_type) else "chunked loss (no Liger)"]
    if use_compile(cfg, device_type):
        parts.append("torch.compile")
    return "; ".join(parts)
