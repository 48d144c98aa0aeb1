"""LoRA for ``nn.Conv1d`` / ``nn.Conv2d``: A is a conv with the base's kernel into r channels, B a 1×1
conv from r channels to the base's output channels, so ΔW = s·B∘A has the base kernel's shape."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoraLayer


class Conv(LoraLayer):
    """LoRA around ``nn.Conv1d`` or ``nn.Conv2d`` with groups=1.

    Shapes (2-d): x (N, C_in, H, W) → y (N, C_out, H', W'); A: Conv2d(C_in, r, kernel, stride, padding,
    dilation), B: Conv2d(r, C_out, 1). ΔW (C_out, C_in, kh, kw) = s · Σ_j B[:, j] · A[j].
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        """Input channels (PEFT's ``in_features`` for a convolution)."""
        return int(self.base_layer.in_channels)

    @property
    def out_features(self) -> int:
        """Output channels (PEFT's ``out_features`` for a convolution)."""
        return int(self.base_layer.out_channels)

    def _create_factors(self, adapter_name: str, r: int) -> None:
        base = self.base_layer
        conv_cls = type(base)
        self.lora_A[adapter_name] = conv_cls(
            base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, bias=False, padding_mode=base.padding_mode,
        )
        self.lora_B[adapter_name] = conv_cls(r, base.out_channels, 1, bias=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        # B (C_out, r, 1..), A (r, C_in, k..): contract over r.
        delta = torch.einsum("or,r...->o...", b.float().flatten(1), a.float())
        return delta * self.scaling[adapter_name]

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dropped = self.lora_dropout[adapter_name](self._adapter_input(x, adapter_name))
        return self.lora_B[adapter_name](self.lora_A[adapter_name](dropped)) * self.scaling[adapter_name]

