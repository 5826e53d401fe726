"""8-bit AdamW through bitsandbytes (Dettmers et al.): blockwise-quantised Adam moments.

bitsandbytes implements it for CUDA and, since 0.45, the CPU; we only build it. Tensors
smaller than 4,096 elements keep fp32 moments (bitsandbytes' `min_8bit_size`), the rest
store each moment as uint8 codes with one fp32 absmax per 256-element block.
"""

from __future__ import annotations

from ..errors import BudgetuneError
from . import register


@register("adamw8bit")
def adamw8bit(groups, cfg):
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise BudgetuneError("optim.name 'adamw8bit' needs bitsandbytes: pip install 'budgetune[bnb]' "
                             "(or pip install bitsandbytes), or choose optim.name adamw / adamw_fp8") from e
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
