"""LoRA for ``nn.Linear``: y = W0·x + b + s·B·A·dropout(x), W0 ∈ R^{d×k} stored (out, in)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .base import LoraLayer


class Linear(LoraLayer):
    """LoRA around an ``nn.Linear(k, d)``.

    Shapes: x (..., k) → y (..., d); ``lora_A[name]`` is ``nn.Linear(k, r)`` (weight r×k) and
    ``lora_B[name]`` is ``nn.Linear(r, d)`` (weight d×r), PEFT's layout, so state-dict keys match PEFT's.
    A DoRA adapter also has ``lora_magnitude_vector[name]`` (d,) (see ``lorakit.layers.dora``).
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True
    fan_in_fan_out = False
    """True when the base weight is stored (in, out), as GPT-2's Conv1D does."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        # The fused path recomputes the base matmul itself, so only for base kinds whose forward it knows.
        self._fusable_base = self._is_fusable_base(base_layer)

    @staticmethod
    def _is_fusable_base(base_layer: nn.Module) -> bool:
        return type(base_layer) is nn.Linear

    @property
    def in_features(self) -> int:
        return int(self.base_layer.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[0])

    def _create_factors(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _weight_as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight viewed as (d, k); GPT-2's Conv1D overrides this with a transpose."""
        return weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        delta = (b.float() @ a.float()) * self.scaling[adapter_name]  # (d, r)·(r, k) = (d, k)
        return self._weight_as_out_in(delta)

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = (s·B)·A for an (out, in) weight; ΔWᵀ = Aᵀ·(s·B)ᵀ for Conv1D's (in, out) one."""
        a, b = self.factors(adapter_name)
        dtype = torch.promote_types(a.dtype, torch.float32)
        a, sb = a.to(dtype), b.to(dtype) * self.scaling[adapter_name]
        return (a.t(), sb.t()) if self.fan_in_fan_out else (sb, a)

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        dropped = self.lora_dropout[adapter_name](self._adapter_input(x, adapter_name))
        # (x·Aᵀ)·Bᵀ: never forms the d×k product B·A.
        return (dropped @ a.t()) @ b.t() * self.scaling[adapter_name]

    def _fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor | None:
        """y = x·W0ᵀ + b + Σ s·B·A·dropout(x) via ``ops.lora_linear``; None where it does not apply (see
        ``lorakit.ops``: autocast, dtype mismatch, hooked or unknown base, compiling with dropout)."""
        # The hot path of every adapted layer (a decode step runs it ~50 times for ~10 µs of kernels), so
        # submodules and parameters are read from the dicts nn.Module keeps them in: each
        # nn.Module.__getattr__ is a Python call, and a layer would otherwise make about ten of them.
        variants = self.lora_variant
        if variants and not variants.keys().isdisjoint(live):
            # A variant (DoRA) changes the whole output: its own kernel, for one live adapter.
            return variants[live[0]].fused_forward(self, live[0], x) if len(live) == 1 else None
        modules: dict[str, Any] = self._modules
        base = modules["base_layer"]
        if not (self._fusable_base and ops.fused_enabled()) or ops.has_hooks(base):
            return None
        params = base._parameters
        weight, bias = params["weight"], params.get("bias")
        if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        lora_a, lora_b = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropouts = modules["lora_dropout"]._modules
        adapters = []
        for name in live:
            drop = dropouts[name]
            if isinstance(drop, nn.Identity):
                p = 0.0
            elif isinstance(drop, nn.Dropout):
                p = drop.p if drop.training else 0.0
                if p > 0.0 and torch.compiler.is_compiling():
                    return None  # the compiler regenerates dropout masks itself; give it plain ops
            else:
                return None  # a dropout module we do not know how to redraw
            adapters.append((lora_a[name]._parameters["weight"], lora_b[name]._parameters["weight"],
                             self.scaling[name], p))
        return ops.lora_linear(x, weight, bias, self.fan_in_fan_out, adapters)

    def _init_from_base_weight(self, adapter_name: str, init: str) -> None:
        """PiSSA / OLoRA: A, B from the top-r SVD / QR of W0; W0 -= s·B·A so the output is unchanged."""
        if getattr(self.base_layer, "is_quantized", False):  # its weight is a read-only dequantized copy
            raise ValueError(f"init_lora_weights={init!r} rewrites W0, which a quantized base cannot store; "
                             "use init_lora_weights=True, or initialise on the full-precision base before quantizing.")
        a, b = self.factors(adapter_name)
        r, scale = self.r[adapter_name], self.scaling[adapter_name]
        weight = self.base_layer.weight
        w = self._weight_as_out_in(weight.data).float()  # (d, k)
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = (s[:r] / scale).sqrt()
            new_a, new_b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:  # olora
            q, rr = torch.linalg.qr(w)
            new_a, new_b = rr[:r], q[:, :r]  # as PEFT: the residual W0 - s·Q_r·R_r stays in the base
        with torch.no_grad():
            a.copy_(new_a)
            b.copy_(new_b)
            adjusted = w - scale * (new_b @ new_a)
            weight.data = self._weight_as_out_in(adjusted).to(weight.dtype).contiguous()
