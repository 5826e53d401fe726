"""Full fine-tuning: every parameter trains."""

from dataclasses import dataclass

from ..method_options import MethodOptions
from . import Method, register


@dataclass
class FullOptions(MethodOptions):
    name: str = "full"


@register
class Full(Method):
    name = "full"
    Options = FullOptions

    def prepare(self, model, opts):
        model.requires_grad_(True)
        return model
