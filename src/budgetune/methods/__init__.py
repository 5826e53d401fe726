"""Training methods behind one small interface, found by name in METHODS.

A method decides which parameters train and how the result is saved:

    class MyMethod(Method):
        name = "my-method"
        Options = MyOptions            # dataclass of its config keys (subclass of MethodOptions)
        def prepare(self, model, opts) -> model

Adding a method is adding a module that calls `register(MyMethod)` and importing it below.
"""

from __future__ import annotations

from pathlib import Path

from ..method_options import MethodOptions


class Method:
    name: str = ""
    Options: type = MethodOptions
    adapter: bool = False  # True: a frozen base with trained additions (its weights stay bf16 on a GPU)
    output: str = "model"  # what save_pretrained writes: "model" (transformers folder) or "adapter" (peft folder)
    quantized_base: bool = False  # True: runs on a quantised frozen base (model.quantize; peft adapters on bnb layers)

    def prepare(self, model, opts):
        """Freeze/wrap the model for training; return the model to train."""
        raise NotImplementedError

    switches = False  # True: the set of trainable parameters changes during training (LISA)

    def select(self, model, opts, step: int) -> bool:
        """Choose what trains from `step` on; True if that changed (the loop rebuilds the optimizer)."""
        return False

    def after_update(self, model, opts, progress: float) -> None:
        """Called after each optimizer step, gradients still present (AdaLoRA reallocates its ranks)."""

    def regularizer(self, model):
        """A term added to each micro-batch's loss (a scalar tensor), or None."""
        return None

    def state_dict(self, model) -> tuple[dict, dict]:
        """What a checkpoint must hold beyond the parameters: (named tensors, JSON-able info)."""
        return {}, {}

    def load_state_dict(self, model, tensors: dict, info: dict) -> None:
        """Restore what `state_dict` returned."""

    def saved_parameters(self, model) -> dict:
        """Parameters a checkpoint must hold to resume exactly: by default the trainable ones."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def lr_scales(self, opts) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name substring (e.g. LoRA+: {"lora_B": 16})."""
        return {}

    def save_pretrained(self, model, path: Path) -> None:
        """Write the trained result in Hugging Face format (full model or peft adapter)."""
        model.save_pretrained(str(path), safe_serialization=True)

    def merged(self, model):
        """A plain transformers model with the trained change folded in."""
        return model


METHODS: dict[str, Method] = {}


def register(method_cls: type[Method]) -> type[Method]:
    METHODS[method_cls.name] = method_cls()
    return method_cls


def get_method(name: str) -> Method:
    return METHODS[name]


from . import adalora, badam, freeze, full, increlora, lisa, lora, mos, peft_tuners, tied_lora  # noqa: E402,F401  (registration)
