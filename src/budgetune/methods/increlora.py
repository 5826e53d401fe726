"""IncreLoRA (Zhang et al.): LoRA ranks start small and grow on the matrices that matter.

Ours (no library implements it), on peft's LoRA layers. Every adapted matrix is allocated
`max_r` rank components, of which a mask keeps `init_r` active at the start (a forward hook
on lora_A multiplies its output by the mask, so inactive components get no gradient and, B
starting at zero, contribute nothing). After each optimizer step, AdaLoRA-style importance is
tracked per parameter — sensitivity |θ·∇θ| smoothed by `beta1`, times its uncertainty
smoothed by `beta2` — and a matrix's score is the mean over its active components. The total
active rank follows budget *progress*: `init_r` per matrix until `tinit`, then growing
linearly to `target_r` per matrix (the total budget) at 1 − `tfinal`; whenever it lags the
schedule the highest-scoring matrices with room (< max_r) each get one more component.
Masks and importance go into checkpoints (exact resume). Allocation is `max_r` per matrix —
that is the memory the planner counts — while the trained result has the budget's ranks: it
is saved as a plain peft LoRA with a per-module `rank_pattern` (inactive components dropped,
`alpha_pattern` keeping the scale), so it loads with peft like any adapter.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..method_options import MethodOptions
from . import Method, register


@dataclass
class IncreLoraOptions(MethodOptions):
    name: str = "increlora"
    init_r: int = 1  # active rank every matrix starts with
    target_r: int = 8  # average active rank at the end (total budget = target_r × matrices)
    max_r: int = 16  # rank components allocated per matrix: the most one matrix can grow to
    tinit: float = 0.1  # fraction of the budget before ranks start growing
    tfinal: float = 0.2  # fraction of the budget at the end with ranks fixed
    alpha: float = 32.0  # scale α/max_r on every component
    dropout: float = 0.0
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of the uncertainty
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def scheduled_total(progress: float, matrices: int, opts: IncreLoraOptions) -> int:
    """Total active rank the schedule asks for at this budget progress."""
    start, end = matrices * opts.init_r, matrices * opts.target_r
    span = max(1e-9, 1 - opts.tinit - opts.tfinal)
    return start + math.floor((end - start) * min(1.0, max(0.0, (progress - opts.tinit) / span)) + 1e-9)


@register
class IncreLora(Method):
    name = "increlora"
    Options = IncreLoraOptions
    adapter = True
    output = "adapter"

    def prepare(self, model, opts):
        from peft import LoraConfig, get_peft_model

        from ..errors import ConfigError

        if not 1 <= opts.init_r <= opts.target_r <= opts.max_r:
            raise ConfigError("config keys 'method.init_r', 'method.target_r', 'method.max_r': need 1 ≤ init_r ≤ target_r ≤ max_r, "
                              f"got {opts.init_r}, {opts.target_r}, {opts.max_r}")
        if not (0 <= opts.tinit and 0 <= opts.tfinal and opts.tinit + opts.tfinal < 1):
            raise ConfigError("config keys 'method.tinit' and 'method.tfinal': fractions of the budget with tinit + tfinal < 1, "
                              f"got {opts.tinit} and {opts.tfinal}")
        targets = opts.target_modules
        model = get_peft_model(model, LoraConfig(r=opts.max_r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, task_type="CAUSAL_LM",
                                                 target_modules="all-linear" if targets == ["all-linear"] else targets))
        masks = {}
        for name, module in model.named_modules():
            if name.endswith(".lora_A.default"):
                mask = torch.zeros(opts.max_r, device=module.weight.device)
                mask[: opts.init_r] = 1
                masks[name[: -len(".lora_A.default")]] = mask
                module.register_forward_hook(lambda mod, args, out, mask=mask: out * mask.to(out.dtype))
        model._increlora = {"masks": masks, "ema": {}, "unc": {}}
        return model

    @staticmethod
    def _factors(model):
        named = dict(model.named_parameters())
        for key in model._increlora["masks"]:
            yield key, named[f"{key}.lora_A.default.weight"], named[f"{key}.lora_B.default.weight"]

    def after_update(self, model, opts, progress: float) -> None:
        state = model._increlora
        masks, ema, unc = state["masks"], state["ema"], state["unc"]
        scores = {}
        with torch.no_grad():
            for key, a, b in self._factors(model):
                total, count = 0.0, 0
                for tag, p, active in (("A", a, masks[key][:, None]), ("B", b, masks[key][None, :])):
                    if p.grad is None:
                        continue
                    ipt = (p * p.grad).abs()
                    name = f"{key}/{tag}"
                    if name not in ema:
                        ema[name], unc[name] = torch.zeros_like(p), torch.zeros_like(p)
                    ema[name].mul_(opts.beta1).add_(ipt, alpha=1 - opts.beta1)
                    unc[name].mul_(opts.beta2).add_((ipt - ema[name]).abs(), alpha=1 - opts.beta2)
                    s = (ema[name] * unc[name] * active).sum()
                    total += float(s)
                    count += int(active.sum()) * (p.shape[1] if tag == "A" else p.shape[0])
                scores[key] = total / max(count, 1)
            self._grow(masks, scores, scheduled_total(progress, len(masks), opts), opts.max_r)

    @staticmethod
    def _grow(masks: dict, scores: dict, target: int, max_r: int) -> None:
        total = int(sum(int(m.sum()) for m in masks.values()))
        while total < target:
            room = sorted((k for k in masks if int(masks[k].sum()) < max_r), key=lambda k: -scores.get(k, 0.0))
            if not room:
                return
            for key in room[: target - total]:  # one more component each, most important first
                masks[key][int(masks[key].sum())] = 1
                total += 1

    def ranks(self, model) -> dict[str, int]:
        return {k: int(m.sum()) for k, m in model._increlora["masks"].items()}

    def state_dict(self, model) -> tuple[dict, dict]:
        state = model._increlora
        tensors = {f"mask/{k}": m for k, m in state["masks"].items()}
        tensors.update({f"ema/{k}": t for k, t in state["ema"].items()})
        tensors.update({f"unc/{k}": t for k, t in state["unc"].items()})
        return tensors, {}

    def load_state_dict(self, model, tensors: dict, info: dict) -> None:
        state = model._increlora
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "mask":
                state["masks"][name].copy_(t)
            else:
                state[kind][name] = t.to(state["masks"][next(iter(state["masks"]))].device).clone()

    def merged(self, model):
        return model.merge_and_unload()  # inactive components have B = 0 (never trained): the merge is exact

    def save_pretrained(self, model, path: Path) -> None:
        """A plain peft LoRA with each module's active rank (rank_pattern) and scale (alpha_pattern)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        masks = model._increlora["masks"]
        config = model.peft_config["default"]
        state = get_peft_model_state_dict(model)
        prefix = "base_model.model."
        out, rank_pattern, alpha_pattern = {}, {}, {}
        for key, mask in masks.items():
            keep = mask.bool().cpu()
            module = key[len(prefix):] if key.startswith(prefix) else key
            a = state[f"{prefix}{module}.lora_A.weight"].detach().cpu()[keep]
            b = state[f"{prefix}{module}.lora_B.weight"].detach().cpu()[:, keep]
            out[f"{prefix}{module}.lora_A.weight"], out[f"{prefix}{module}.lora_B.weight"] = a.contiguous(), b.contiguous()
            rank_pattern[module] = int(keep.sum())
            alpha_pattern[module] = config.lora_alpha * int(keep.sum()) / config.r  # keeps α/max_r as the scale
        save_file(out, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        saved = copy.deepcopy(config)
        saved.rank_pattern, saved.alpha_pattern = rank_pattern, alpha_pattern
        saved.save_pretrained(str(path))
