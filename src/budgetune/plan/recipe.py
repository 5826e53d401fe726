"""A recipe: everything about a training step that decides its memory and speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal


@dataclass(frozen=True)
class Recipe:
    method: str = "full"  # a name in budgetune.methods.METHODS
    lora_r: int = 16  # adapter methods only
    lora_targets: tuple[str, ...] = ("all-linear",)
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    # fp32: fp32 weights, no autocast (CPU). bf16-mixed: fp32 weights + bf16 autocast (GPU full FT).
    # Adapter methods on a GPU keep the frozen base in bf16 (see models.weights_dtype).
    # pure-bf16: bf16 weights, gradients and AdamW states (+ a bf16 Kahan compensation buffer), no autocast.
    precision: Literal["fp32", "bf16-mixed", "pure-bf16"] = "fp32"
    attention: str = "sdpa"  # the resolved model.attn_implementation (attention.py): flash/flex build no [T, T] mask
    fused_loss: bool = False  # Liger's fused linear + cross-entropy (fastpath.py) instead of the chunked head + loss
    optimizer: str = "adamw"  # a name in budgetune.optim.OPTIMIZERS
    quantize: str | None = None  # QLoRA: the frozen base quantised (nf4, fp4, int8); adapter methods only
    packed: bool = True
    world_size: int = 1
    zero_stage: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def prepare_method(model, recipe: Recipe):
    """Apply the recipe's method to a model, as training would."""
    from ..methods import get_method

    method = get_method(recipe.method)
    return method.prepare(model, method.Options(**recipe.extra.get("method_options", {"name": recipe.method})))
