"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): how it changes a LoRA layer.

Per adapter, DoRA splits the adapted weight into a direction and a trainable magnitude m per output
feature:

    W′ = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖

the norm taken per output feature (a row of an (out, in) weight, a column of GPT-2 Conv1D's (in, out) one).
m starts at ‖W0 + s·B·A‖ (‖W0‖ with B = 0), so a new adapter is plain LoRA (the base itself when B = 0).
The norm is a constant in backward (paper §4.3, as PEFT): A and B get gradients through the direction,
m through f = m / ‖W0 + s·B·A‖.

Forward without forming W′: with f (d,), y = f ⊙ (W0·x + s·B·A·x) + b. What an adapter adds to the output
so far is therefore (f − 1)·(result − b) + f·s·B·A·x (PEFT's form; with several active adapters a DoRA
adapter rescales what the ones before it produced, and merging in the same order gives the same weight).
With dropout active (training) the base term uses the dropped input, (f − 1)·W0·drop(x), as PEFT does.
The norm comes from small products, never from the d×k matrix W0 + s·B·A:

    ‖W0_i + s·B_i·A‖² = ‖W0_i‖² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ       (B_i: row i of B, 1×r)

‖W0_i‖² is cached while W0 is unchanged, A·W0ᵀ (r×d) is one skinny product reading W0 once, A·Aᵀ is r×r.
One adapter live on a plain Linear/Conv1D base runs the fused ``ops.dora_linear``.

Merge: W ← round(f ⊙ (W + s·B·A)) with f computed from the unmerged W0 before any weight changes. The
unmerge record of ``lorakit.layers.base`` keeps f, so unmerging computes round(W′/f − s·B·A) and corrects it
to W0 bit for bit, exactly as for plain LoRA.

Supported bases: ``SUPPORTED`` (a layer class says so with ``supports_dora``). Mixed batches run DoRA
adapters through the per-adapter loop of ``lorakit.mixed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

if TYPE_CHECKING:
    from .base import LoraLayer

SUPPORTED = ("torch.nn.Linear", "transformers Conv1D (GPT-2)")
"""Base layer kinds DoRA adapts (PEFT also has Embedding and Conv; lorakit refuses them with this list)."""

MAGNITUDE = "lora_magnitude_vector"
"""The container of m in a layer: ``<module>.lora_magnitude_vector.<adapter>`` in memory, PEFT's
``<module>.lora_magnitude_vector`` on disk (the adapter name removed by ``io.file_key``, no ``.weight``)."""


def check_supported(layer: LoraLayer) -> None:
    """ValueError naming the supported kinds unless ``layer`` can hold a DoRA adapter."""
    if not type(layer).supports_dora:
        raise ValueError(
            f"use_dora=True is not supported for {type(layer.base_layer).__name__} layers; DoRA supports "
            f"{', '.join(SUPPORTED)}: narrow target_modules to those or set use_dora=False."
        )
    weight = layer.base_layer.weight
    if not weight.is_floating_point():  # e.g. a packed 4-bit weight: the norm needs W0's values
        raise ValueError(
            f"use_dora=True needs a floating-point base weight, but this {type(layer.base_layer).__name__} "
            f"stores {weight.dtype}; apply DoRA to an unquantized base or set use_dora=False."
        )


def create_magnitude(layer: LoraLayer, adapter_name: str, like: torch.Tensor | None = None) -> nn.Parameter:
    """Register m (out_features,), uninitialised, on ``like``'s device and dtype (or torch's defaults, which
    honour a ``torch.device("meta")`` block: the loader probes shapes that way)."""
    out_features = int(_out_in(layer, layer.base_layer.weight).shape[0])
    magnitude = nn.Parameter(torch.empty(out_features, device=None if like is None else like.device,
                                         dtype=None if like is None else like.dtype))
    getattr(layer, MAGNITUDE)[adapter_name] = magnitude
    return magnitude


class Dora:
    """DoRA for one adapter of a Linear-like layer: held in ``layer.lora_variant[adapter_name]``.

    The parameter m lives in the layer's ``lora_magnitude_vector`` (so ``.to()``, ``state_dict`` and
    freezing treat it like A and B); this object holds only the cache of ‖W0‖² per output feature.
    """

    def __init__(self) -> None:
        self._base_square: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ parameters
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create m = ‖W0 + s·B·A‖ (after A and B are initialised, as PEFT)."""
        a = layer.factors(adapter_name)[0]
        magnitude = create_magnitude(layer, adapter_name, like=a)
        with torch.no_grad():
            magnitude.copy_(self.weight_norm(layer, adapter_name))

    def magnitude(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        return getattr(layer, MAGNITUDE)[adapter_name]

    @torch.no_grad()
    def weight_norm(self, layer: LoraLayer, adapter_name: str, base_weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output feature, (d,) in the adapters' dtype, detached (see the module docstring).

        Args:
            base_weight: W0 as stored by the base layer; default the layer's unmerged weight.
        """
        a, b = (f.detach() for f in layer.factors(adapter_name))
        scale = layer.scaling[adapter_name]
        cacheable = base_weight is None and not layer.merged_adapters
        if base_weight is None:
            base_weight = layer.unmerged_weight()
        w = _out_in(layer, base_weight.detach().to(a.dtype))  # (d, k)
        square = self._base_square_norms(base_weight, w) if cacheable else (w * w).sum(1)
        aw = torch.mm(a, w.t())  # (r, d) = A·W0ᵀ
        cross = (b * aw.t()).sum(1)  # (d,) B_i·(A·W0_iᵀ)
        lora_square = (torch.mm(b, torch.mm(a, a.t())) * b).sum(1)  # (d,) ‖B_i·A‖² via the r×r Gram matrix
        total = square + (2.0 * scale) * cross + (scale * scale) * lora_square
        return total.clamp_min_(0.0).sqrt_()

    def _base_square_norms(self, weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """‖W0_i‖² (d,), cached while the base weight keeps its storage, version, shape and dtype."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, w.dtype, weight.device)
        cached = self._base_square
        if cached is None or cached[0] != key:
            cached = (key, (w * w).sum(1))
            self._base_square = cached
        return cached[1]

    def factor(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """f = m / ‖W0 + s·B·A‖ (d,): differentiable in m only (the norm is detached, paper §4.3)."""
        return self.magnitude(layer, adapter_name) / self.weight_norm(layer, adapter_name)

    # ------------------------------------------------------------------ forward
    def output(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to ``result`` (the layer's output so far, bias included):
        (f − 1)·(result − b) + f·s·B·A·x, or with active dropout (f − 1)·W0·drop(x) + f·s·B·A·drop(x)."""
        a, b = layer.factors(adapter_name)
        factor = self.factor(layer, adapter_name)
        dropout = layer.lora_dropout[adapter_name]
        x = layer._adapter_input(x, adapter_name)
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = layer.bias
            base = result if bias is None else result - bias
        else:  # PEFT's rule: the base product again, on the dropped input
            x = dropout(x)
            weight = _out_in(layer, layer.base_layer.weight)
            base = F.linear(x, weight.to(x.dtype))
        lora = (x @ a.t()) @ b.t() * layer.scaling[adapter_name]
        return ((factor - 1.0) * base + factor * lora).to(result.dtype)

    def fused_forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's whole output through ``ops.dora_linear`` when this adapter is the only live one; None
        where that does not apply (active dropout, autocast, dtypes that differ, a hooked or unknown base)."""
        base = layer.base_layer
        if not (layer.__dict__.get("_fusable_base", False) and ops.fused_enabled()) or ops.has_hooks(base):
            return None
        a, b = layer.factors(adapter_name)
        weight = base.weight
        if x.dtype != weight.dtype or a.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        if layer.training and not isinstance(layer.lora_dropout[adapter_name], nn.Identity):
            return None
        return ops.dora_linear(x, weight, base.bias, _fan_in_fan_out(layer), a, b,
                               layer.scaling[adapter_name], self.magnitude(layer, adapter_name),
                               self.weight_norm(layer, adapter_name))

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_scale(self, layer: LoraLayer, adapter_name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """f shaped to scale the weight viewed (rows, -1): (d, 1) for (out, in), (1, d) for Conv1D."""
        factor = self.magnitude(layer, adapter_name).detach() / self.weight_norm(layer, adapter_name, base_weight)
        factor = factor.to(base_weight.device)
        return factor.view(1, -1) if _fan_in_fan_out(layer) else factor.view(-1, 1)


def _fan_in_fan_out(layer: LoraLayer) -> bool:
    """True when the base weight is stored (in, out) (GPT-2 Conv1D): output features are its columns."""
    return bool(getattr(type(layer), "fan_in_fan_out", False))


def _out_in(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """The base weight viewed (out, in)."""
    return weight.t() if _fan_in_fan_out(layer) else weight
