"""LoRA for transformers' GPT-2 ``Conv1D``, whose weight is stored (in, out): y = x·W0 + b.

A and B keep nn.Linear's (out, in) orientation (as PEFT stores them on disk); only ΔW is transposed
when merged, because Conv1D's weight is ΔWᵀ-shaped ("fan_in_fan_out").
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear


class GPT2Conv1D(Linear):
    """LoRA around ``transformers.pytorch_utils.Conv1D(nf=d, nx=k)``, weight (k, d)."""

    fan_in_fan_out = True

    @staticmethod
    def _is_fusable_base(base_layer: nn.Module) -> bool:
        cls = type(base_layer)  # transformers' Conv1D itself, not a subclass with another forward
        return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"

    @property
    def in_features(self) -> int:
        return int(self.base_layer.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[1])

    def _weight_as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()
