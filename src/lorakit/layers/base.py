"""LoraLayer: what every adapted layer shares — adapters keyed by name, activation, merge and unmerge.

A LoRA layer wraps (does not subclass) the frozen ``base_layer`` and adds, per adapter name, a pair of
low-rank factors whose product is the weight update

    ΔW = s · B·A,   s = α/r (α/√r with rsLoRA),   A ∈ R^{r×k}, B ∈ R^{d×r}

so that h = W0·x + s·B·A·x. The subclasses (one per base layer kind) say how A and B are stored, how ΔW
is laid out in the base weight's orientation, and how the LoRA branch is computed on an input.

Bit-exact unmerge: merging computes W = round(W0 + ΔW) in the weight's dtype, which destroys low bits of
W0. To give them back we keep, per merged adapter, the difference in ULPs between W0 and what unmerging
would otherwise compute, round(W - ΔW). That difference is almost always 0 or ±1, so it is stored as int8
(1 byte per weight element: 25 % of an fp32 weight, 50 % of a bf16/fp16 one), widened to int64 only in
the rare layer where some element needs more. Unmerging adds it back, so W0 returns bit for bit however
many merge/unmerge cycles run. The memory is freed by unmerge and by ``merge_and_unload``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..mixed import BatchPlan

BASE_ROW = "__base__"
"""Adapter name that, in a mixed batch, means "no adapter for this row"."""

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


class LoraLayer(nn.Module):
    """Base of all LoRA layers: holds ``base_layer`` and the per-adapter state.

    Subclasses implement ``_create_factors``, ``delta_weight`` and ``lora_output``.
    """

    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B")
    base_layer: Any  # the wrapped module; typed loosely because its kind varies (Linear, Conv1D, …)
    lora_A: Any
    lora_B: Any

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by the model wrapper for the duration of a mixed-batch forward (see lorakit.mixed).
        self.batch_plan: BatchPlan | None = None
        # adapter name -> ULP correction restoring W0 bit-exactly on unmerge (see module docstring).
        self._unmerge_residual: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
    ) -> None:
        """Create adapter ``adapter_name`` with rank r, initialised per ``init_lora_weights``."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_factors(adapter_name, r)
        self._init_factors(adapter_name, init_lora_weights)
        # Adapters live on the base weight's device; fp32 unless the base is fp64 (low-precision bases
        # keep fp32 adapters: their updates are tiny relative to W0 and would round away in bf16).
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                item.to(device=weight.device, dtype=dtype)  # Module.to also handles the meta device
            else:
                container[adapter_name] = nn.Parameter(item.detach().to(device=weight.device, dtype=dtype))
        if init_lora_weights in ("pissa", "olora"):
            self._init_from_base_weight(adapter_name, init_lora_weights)

    def _create_factors(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _create_factors")

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) parameters of an adapter in nn.Linear (out, in) orientation for Linear-like layers."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _init_factors(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.factors(adapter_name)
        with torch.no_grad():
            if init == "gaussian":
                # The paper draws A Gaussian; PEFT's "gaussian" uses std 1/r, and so do we (parity).
                nn.init.normal_(a, std=1.0 / self.r[adapter_name])
            else:
                # Kaiming-uniform, as nn.Linear's default init (PEFT's init_lora_weights=True).
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                # Non-zero B so that tests of merge/save cannot pass trivially.
                nn.init.normal_(b, std=0.02)
            else:
                nn.init.zeros_(b)

    def _init_from_base_weight(self, adapter_name: str, init: str) -> None:
        raise ValueError(
            f"init_lora_weights={init!r} is only implemented for Linear and GPT-2 Conv1D layers, "
            f"not {type(self.base_layer).__name__}; use True or 'gaussian' for this target."
        )

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_param_names + ("lora_dropout",):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ math
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = s·B·A laid out like ``base_layer.weight``, in fp32 (or the adapter's dtype if wider)."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight")

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """s·B·A·dropout(x) for input x (the LoRA branch alone), in the adapter's dtype."""
        raise NotImplementedError(f"{type(self).__name__} must implement lora_output")

    def _adapter_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.factors(adapter_name)[0]
        return x.to(a.dtype) if x.is_floating_point() else x

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """h = base(x) + Σ_active s·B·A·dropout(x); exactly ``base_layer(x)`` when nothing is live.

        Adapters that are merged (already inside W) or disabled add no operation at all. Linear-like
        layers take the fused path of ``lorakit.ops`` where it applies; a mixed batch (``batch_plan``)
        goes through ``lorakit.mixed``.
        """
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        plan = self.batch_plan
        if plan is not None:
            return plan.apply(self, x, self.base_layer(x, *args, **kwargs))
        live = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.r]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs:
            fused = self._fused_forward(x, live)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in live:
            result = result + self.lora_output(x, name).to(result.dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor | None:
        """The whole forward through ``lorakit.ops``' fused function, or None where it does not apply
        (then the plain autograd path above runs). Layer kinds with a fused kernel override this."""
        return None

    # ------------------------------------------------------------------ merge
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add s·B·A into the base weight for each adapter (default: the active ones); idempotent."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.r:
                continue
            weight = self.base_layer.weight
            delta = self.delta_weight(name).to(weight.device)
            original = weight.data
            merged = (original.to(delta.dtype) + delta).to(original.dtype)
            self._unmerge_residual[name] = _ulp_residual(original, self._unmerged_estimate(merged, delta))
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again (last merged first), restoring W0 bit for bit."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            delta = self.delta_weight(name).to(weight.device)
            estimate = self._unmerged_estimate(weight.data, delta)
            residual = self._unmerge_residual.pop(name).to(weight.device)
            weight.data = _apply_ulp_residual(estimate, residual)

    @staticmethod
    def _unmerged_estimate(merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (merged.to(delta.dtype) - delta).to(merged.dtype)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"


def _ulp_residual(target: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """bits(target) - bits(estimate) as int8 when it fits (it almost always does), else int64."""
    int_dtype = _INT_VIEW.get(target.dtype)
    if int_dtype is None:
        raise TypeError(f"cannot merge into a {target.dtype} weight; lorakit merges float16/bfloat16/float32/64.")
    diff = target.view(int_dtype).to(torch.int64) - estimate.view(int_dtype).to(torch.int64)
    if diff.numel() == 0 or (diff.abs().max() <= 127):
        return diff.to(torch.int8)
    return diff


def _apply_ulp_residual(estimate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    int_dtype = _INT_VIEW[estimate.dtype]
    bits = estimate.view(int_dtype).to(torch.int64) + residual.to(torch.int64)
    return bits.to(int_dtype).view(estimate.dtype)
