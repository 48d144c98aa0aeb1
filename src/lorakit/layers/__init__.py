"""One LoRA layer kind per file; ``layer_class_for`` picks the kind for a base module."""

from __future__ import annotations

from torch import nn

from . import dora
from .base import BASE_ROW, LoraLayer
from .conv import Conv
from .conv1d import GPT2Conv1D
from .embedding import Embedding
from .linear import Linear

SUPPORTED_LAYER_TYPES = ("torch.nn.Linear", "transformers Conv1D (GPT-2)", "torch.nn.Embedding",
                         "torch.nn.Conv1d", "torch.nn.Conv2d")


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (checked by name so lorakit's core needs no transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or None if the kind is unsupported."""
    if isinstance(module, nn.Linear):
        return Linear
    if is_gpt2_conv1d(module):
        return GPT2Conv1D
    if isinstance(module, nn.Embedding):
        return Embedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return Conv
    return None


__all__ = ["BASE_ROW", "LoraLayer", "Linear", "GPT2Conv1D", "Embedding", "Conv", "layer_class_for",
           "is_gpt2_conv1d", "SUPPORTED_LAYER_TYPES", "dora"]
