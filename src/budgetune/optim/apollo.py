"""APOLLO and APOLLO-Mini (Zhu et al.): SGD-like memory at AdamW-like quality, via `apollo-torch`.

The package implements the update: Adam's moments live on a *random* rank-r projection of
each matrix's gradient (a seeded Gaussian, redrawn every `update_gap` steps, no SVD); the
ratio ‖Adam(R)‖ / ‖R‖ per channel (APOLLO) or per tensor (APOLLO-Mini, rank 1) scales the
raw full-rank gradient, which is the update, times √scale, with Fira's norm-growth limiter.
Ours is only the wiring:

- which tensors are projected: every matrix whose smaller side exceeds the rank (as our
  GaLore, so the planner's GaLore state formula holds); vectors get the package's plain
  AdamW path (same optimizer, a group without a rank);
- checkpoints: the package keeps a projector *object* in each state, which a weights-only
  checkpoint cannot hold, so `state_dict` stores its matrix and seed as plain values and
  `load_state_dict` rebuilds the object — resume is exact.
"""

from __future__ import annotations

import functools

from ..errors import BudgetuneError
from . import register

PROJECTOR_FIELDS = ("ortho_matrix", "seed", "svd_count")


@functools.cache  # one subclass, built on first use (apollo-torch is optional)
def _apollo_class():
    try:
        from apollo_torch.apollo import AdamW
    except ImportError as e:
        raise BudgetuneError("optim.name 'apollo' / 'apollo_mini' needs apollo-torch: pip install 'budgetune[apollo]' "
                             "(or pip install apollo-torch), or choose optim.name galore") from e

    class Apollo(AdamW):
        def state_dict(self):
            out = super().state_dict()
            out["state"] = {k: dict(v) for k, v in out["state"].items()}  # torch shares the live dicts: copy
            for state in out["state"].values():
                projector = state.get("projector")
                if projector is not None:
                    state["projector"] = {f: getattr(projector, f) for f in PROJECTOR_FIELDS}
            return out

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    saved = state.get("projector")
                    if isinstance(saved, dict):
                        projector = self._initialize_projector(group, state)
                        for f in PROJECTOR_FIELDS:
                            value = saved[f]
                            setattr(projector, f, value.to(p.device) if hasattr(value, "to") else value)
                        state["projector"] = projector

    return Apollo


def build(groups, cfg, rank: int, scale_type: str, scale: float):
    split = []
    for group in groups:
        projected = [p for p in group["params"] if p.ndim == 2 and min(p.shape) > rank]
        plain = [p for p in group["params"] if not (p.ndim == 2 and min(p.shape) > rank)]
        if projected:
            split.append({**group, "params": projected, "rank": rank, "proj": "random", "proj_type": "std",
                          "update_proj_gap": cfg.update_gap, "scale": scale, "scale_type": scale_type})
        if plain:
            split.append({**group, "params": plain})
    return _apollo_class()(split, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@register("apollo")
def apollo(groups, cfg):
    return build(groups, cfg, rank=cfg.rank, scale_type="channel", scale=cfg.apollo_scale if cfg.apollo_scale is not None else 1.0)


@register("apollo_mini")
def apollo_mini(groups, cfg):
    return build(groups, cfg, rank=1, scale_type="tensor", scale=cfg.apollo_scale if cfg.apollo_scale is not None else 128.0)
