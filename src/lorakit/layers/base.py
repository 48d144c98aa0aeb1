"""LoraLayer: what every adapted layer shares — adapters keyed by name, activation, merge and unmerge.

A LoRA layer wraps (does not subclass) the frozen ``base_layer`` and adds, per adapter name, a pair of
low-rank factors whose product is the weight update

    ΔW = s · B·A,   s = α/r (α/√r with rsLoRA),   A ∈ R^{r×k}, B ∈ R^{d×r}

so that h = W0·x + s·B·A·x. The subclasses (one per base layer kind) say how A and B are stored, how ΔW
is laid out in the base weight's orientation, and how the LoRA branch is computed on an input.

Bit-exact unmerge: merging computes W = round(W0 + ΔW) in the weight's dtype, which destroys low bits of
W0. To give them back we keep, per merged adapter, the difference in ULPs between W0 and what unmerging
would otherwise compute, round(W - ΔW). That difference is almost always 0 or ±1, so it is stored as int8
(1 byte per weight element: 25 % of an fp32 weight, 50 % of a bf16/fp16 one); the rare element where it
does not fit keeps its W0 value in a short sparse list. Unmerging adds it back, so W0 returns bit for bit
however many merge/unmerge cycles run. The memory is freed by unmerge and by ``merge_and_unload``.

Variants: an adapter may depart from plain LoRA through a small strategy object the layer holds in
``lora_variant[name]`` (DoRA: ``lorakit.layers.dora``). It supplies what the adapter adds to the output and,
for merging, a per-output-feature factor f: the merge then writes W′ = round(f ⊙ (W0 + ΔW)), the record
keeps f, and unmerge corrects round(W′/f − ΔW) to W0 with the same ULP mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import dora

if TYPE_CHECKING:
    from ..mixed import BatchPlan

BASE_ROW = "__base__"
"""Adapter name that, in a mixed batch, means "no adapter for this row"."""

_BLOCK_ELEMENTS = 1 << 19
"""Weight elements per merge block (2 MiB of fp32): ΔW and the temporaries of one block stay in cache."""

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


class LoraLayer(nn.Module):
    """Base of all LoRA layers: holds ``base_layer`` and the per-adapter state.

    Subclasses implement ``_create_factors``, ``delta_weight`` and ``lora_output``.
    """

    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B")
    supports_dora = False
    """Whether ``update_layer(..., use_dora=True)`` is allowed (see ``lorakit.layers.dora``)."""
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
        # Adapters whose branch runs in forward (active, not merged, not disabled); None: recompute. Every
        # change of the state it depends on resets it (the setters below, merge, unmerge, update, delete), so
        # the hot path of a merged or disabled layer is one attribute check before the base call.
        self._live: list[str] | None = None
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Set by the model wrapper for the duration of a mixed-batch forward (see lorakit.mixed).
        self.batch_plan: BatchPlan | None = None
        # adapter name -> ULP correction restoring W0 bit-exactly on unmerge (see module docstring).
        self._unmerge_residual: dict[str, UlpResidual] = {}
        # adapter name -> how it departs from plain LoRA (DoRA); absent for plain LoRA adapters.
        self.lora_variant: dict[str, dora.Dora] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        """Adapters whose outputs are added (in order); set by the model wrapper's ``set_adapter``."""
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active_adapters = list(names)
        self._live = None

    @property
    def disable_adapters(self) -> bool:
        """True inside ``disable_adapter()``: the layer computes the base output only."""
        return self._disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disable_adapters = bool(value)
        self._live = None

    def live_adapters(self) -> list[str]:
        """The adapters whose LoRA branch runs in forward: active, present here, not merged, not disabled."""
        live = self._live
        if live is None:
            live = [] if self._disable_adapters else [
                n for n in self._active_adapters if n not in self.merged_adapters and n in self.r]
            self._live = live
        return live

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
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``adapter_name`` with rank r, initialised per ``init_lora_weights`` (with a DoRA
        magnitude if ``use_dora``)."""
        if use_dora:
            dora.check_supported(self)  # before anything changes
        self.r[adapter_name] = r
        self._live = None
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
            if adapter_name not in container:  # e.g. no DoRA magnitude: created below if asked for
                continue
            item = container[adapter_name]
            created_on_meta = any(t.is_meta for t in (item.parameters() if isinstance(item, nn.Module) else [item]))
            if created_on_meta and not weight.is_meta:  # lorakit.inject.uninitialised_factors: allocate only
                item = item.to_empty(device=weight.device) if isinstance(item, nn.Module) else torch.empty_like(
                    item, device=weight.device)
            if isinstance(item, nn.Module):
                item.to(device=weight.device, dtype=dtype)  # Module.to also handles the meta device
            else:
                container[adapter_name] = nn.Parameter(item.detach().to(device=weight.device, dtype=dtype))
        if init_lora_weights in ("pissa", "olora"):
            self._init_from_base_weight(adapter_name, init_lora_weights)
        if use_dora:  # m from the initialised factors (and the PiSSA/OLoRA-adjusted W0), as PEFT
            variant = dora.Dora()
            variant.init(self, adapter_name)
            self.lora_variant[adapter_name] = variant

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
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_variant):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]  # also resets _live

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

    def adapter_output(self, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        """What adapter ``adapter_name`` adds to ``result`` (the output so far): s·B·A·dropout(x) for plain
        LoRA, its variant's term otherwise."""
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return self.lora_output(x, adapter_name).to(result.dtype)
        return variant.output(self, adapter_name, x, result)

    def _adapter_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.factors(adapter_name)[0]
        return x.to(a.dtype) if x.is_floating_point() else x

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """h = base(x) + Σ_active s·B·A·dropout(x); exactly ``base_layer(x)`` when nothing is live.

        Adapters that are merged (already inside W) or disabled add no operation at all. Linear-like
        layers take the fused path of ``lorakit.ops`` where it applies; a mixed batch (``batch_plan``)
        goes through ``lorakit.mixed``.
        """
        live = self.live_adapters()
        plan = self.batch_plan
        if plan is not None and not self._disable_adapters:
            return plan.apply(self, x, self.base_layer(x, *args, **kwargs))
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs:
            fused = self._fused_forward(x, live)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in live:
            result = result + self.adapter_output(x, name, result)
        return result

    def _fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor | None:
        """The whole forward through ``lorakit.ops``' fused function, or None where it does not apply
        (then the plain autograd path above runs). Layer kinds with a fused kernel override this."""
        return None

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, *, for_unload: bool = False) -> None:
        """Add s·B·A into the base weight for each adapter (default: the active ones); idempotent.

        The weight is updated in place, one block of rows at a time (ΔW, W0 + ΔW and the ULP residual of a
        block stay in cache instead of making ~10 passes over the whole weight in memory).
        ``for_unload`` (``merge_and_unload``): the layer is about to be discarded, so no unmerge record is
        kept (the merged weight is bit-identical; the record's passes are skipped) and unmerge is refused.
        A variant's factor (DoRA's m/‖W0 + ΔW‖) is computed from the unmerged W0 before any weight changes.
        """
        requested = adapter_names if adapter_names is not None else self.active_adapters
        names = [n for n in dict.fromkeys(requested) if n not in self.merged_adapters and n in self.r]
        scales: dict[str, torch.Tensor] = {}
        if any(n in self.lora_variant for n in names):
            base_weight = self.unmerged_weight()
            scales = {n: self.lora_variant[n].merge_scale(self, n, base_weight) for n in names
                      if n in self.lora_variant}
        for name in names:
            weight = self.base_layer.weight
            data = weight.data if weight.data.is_contiguous() else weight.data.contiguous()
            matrix = data.view(data.shape[0], -1)
            scale = scales.get(name)
            if for_unload:
                _merge_in_place_without_record(matrix, self._delta_blocks(name, matrix), scale)
            else:
                self._unmerge_residual[name] = _merge_in_place(matrix, self._delta_blocks(name, matrix), scale)
            if data is not weight.data:
                weight.data = data
            self.merged_adapters.append(name)
            self._live = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again (last merged first), restoring W0 bit for bit."""
        self._require_unmerge_records()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._live = None
            data = self.base_layer.weight.data
            residual = self._unmerge_residual.pop(name)
            _unmerge_in_place(data.view(data.shape[0], -1), self._delta_blocks(name, data), residual)

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter subtracted, bit-exactly as ``unmerge`` does it, without
        changing the layer; the weight itself (no copy) when nothing is merged."""
        weight = self.base_layer.weight.detach()
        if not self.merged_adapters:
            return weight
        self._require_unmerge_records()
        weight = weight.clone(memory_format=torch.contiguous_format)
        for name in reversed(self.merged_adapters):
            _unmerge_in_place(weight.view(weight.shape[0], -1), self._delta_blocks(name, weight),
                              self._unmerge_residual[name])
        return weight

    def _require_unmerge_records(self) -> None:
        missing = [name for name in self.merged_adapters if name not in self._unmerge_residual]
        if missing:
            raise RuntimeError(f"adapter(s) {missing} were merged by merge_and_unload, which keeps no record to "
                               "unmerge them; use merge_adapter() for a reversible merge.")

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L, R) with ΔW = L·R laid out like the base weight viewed (rows, -1); None where ΔW has no such
        split (convolutions), and then merging uses ``delta_weight`` whole."""
        return None

    def _delta_blocks(self, adapter_name: str, weight: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, ΔW[start:stop]) over blocks of weight rows of about ``_BLOCK_ELEMENTS`` elements.

        Merge and unmerge must compute ΔW bit-identically, so both take it from here (same blocks, same
        matmul shapes). Every block is written into the same buffer: a consumer is done with one block (and
        may overwrite it) before it asks for the next."""
        rows = weight.shape[0]
        factors = self.delta_factors(adapter_name)
        if factors is None:
            yield 0, rows, self.delta_weight(adapter_name).to(weight.device).reshape(rows, -1)
            return
        # Contiguous factors and one output buffer for every block: MKL's skinny (r = 8) product is faster
        # on contiguous operands, and a fresh 2 MiB block per step would be fresh pages to fault in.
        left, right = (f.to(weight.device).contiguous() for f in factors)
        step = max(1, _BLOCK_ELEMENTS // max(right.shape[1], 1))
        buffer = left.new_empty(min(step, rows), right.shape[1])
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield start, stop, torch.mm(left[start:stop], right, out=buffer[: stop - start])

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"


@dataclass
class UlpResidual:
    """What restores W0 after a merge: ``diff`` = bits(W0) − bits(round(W − ΔW)) as int8 (wrapping integer
    arithmetic), same shape as the weight viewed (rows, -1); elements where that does not fit keep their W0
    value at flat positions ``index`` in ``value`` instead."""

    diff: torch.Tensor
    index: torch.Tensor
    value: torch.Tensor
    scale: torch.Tensor | None = None  # a variant's factor f (broadcast over the (rows, -1) weight), or None


def _int_view(dtype: torch.dtype) -> torch.dtype:
    int_dtype = _INT_VIEW.get(dtype)
    if int_dtype is None:
        raise TypeError(f"cannot merge into a {dtype} weight; lorakit merges float16/bfloat16/float32/64.")
    return int_dtype


def _merge_in_place(matrix: torch.Tensor, blocks: Iterator[tuple[int, int, torch.Tensor]],
                    scale: torch.Tensor | None = None) -> UlpResidual:
    """matrix ← round(matrix + ΔW) block by block (round(f ⊙ (matrix + ΔW)) with a variant's ``scale`` f);
    returns what ``_unmerge_in_place`` needs to undo it.

    Per block: W′ = round(W0 + ΔW), E = round(W′ − ΔW) (what unmerging computes), d = bits(W0) − bits(E)
    in the weight's integer view. Integer arithmetic wraps, so bits(E) + d = bits(W0) whatever the signs;
    d only has to fit int8, checked with one min/max reduction (elements that do not fit, e.g. where ΔW
    flips a tiny weight's sign, keep their W0 value in the sparse part).
    """
    int_dtype = _int_view(matrix.dtype)  # before any change: an unsupported dtype leaves the weight as it was
    cols = matrix.shape[1]
    diff = torch.empty(matrix.shape, dtype=torch.int8, device=matrix.device)
    index: list[torch.Tensor] = []
    value: list[torch.Tensor] = []
    merged: torch.Tensor | None = None
    for start, stop, delta in blocks:
        w0 = matrix[start:stop]
        if merged is None or merged.shape != w0.shape:  # one buffer reused by every block
            merged = torch.empty_like(w0)
        block_scale = _block_scale(scale, start, stop)
        _rounded_sum(w0, delta, out=merged, scale=block_scale)
        if block_scale is not None:  # E = round(W′/f − ΔW), computed as unmerging will
            estimate = _scaled_estimate(merged, delta, block_scale)
            d = w0.view(int_dtype) - estimate.view(int_dtype)
        elif delta.dtype == matrix.dtype:  # fp32 (fp64) weights: no casts
            estimate = torch.sub(merged, delta, out=delta)  # ΔW is not needed again: E goes in its memory
            d = torch.sub(w0.view(int_dtype), estimate.view(int_dtype), out=estimate.view(int_dtype))
        else:  # bf16/fp16 weights, fp32 ΔW: round to the weight's dtype at each step
            estimate = (merged.to(delta.dtype) - delta).to(matrix.dtype)
            d = w0.view(int_dtype) - estimate.view(int_dtype)
        low, high = torch.aminmax(d)
        if low.item() < -127 or high.item() > 127:
            bad = (d < -127) | (d > 127)
            local = bad.reshape(-1).nonzero().squeeze(1)
            index.append(local + start * cols)
            value.append(w0.reshape(-1)[local].clone())
            d.masked_fill_(bad, 0)
        diff[start:stop] = d
        w0.copy_(merged)
    device = matrix.device
    return UlpResidual(diff,
                       torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=device),
                       torch.cat(value) if value else matrix.new_empty(0), scale)


def _block_scale(scale: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The rows [start, stop) of a per-row factor (d, 1); a per-column one (1, d) applies to every block."""
    if scale is None or scale.shape[0] == 1:
        return scale
    return scale[start:stop]


def _rounded_sum(w0: torch.Tensor, delta: torch.Tensor, out: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """out ← W′ = round(W0 + ΔW) (round(f ⊙ (W0 + ΔW)) with ``scale`` f) in the weight's dtype (out may be
    w0 itself). The one formula for W′, so both merges write bit-identical weights; a bf16/fp16 weight is
    summed with the fp32 ΔW in fp32, rounded once."""
    if scale is not None:
        return out.copy_(w0.to(delta.dtype).add(delta).mul_(scale))
    if delta.dtype == w0.dtype:
        return torch.add(w0, delta, out=out)
    return out.copy_(w0.to(delta.dtype).add_(delta))


def _scaled_estimate(merged: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E = round(W′/f − ΔW) in the weight's dtype: the one formula merge and unmerge both use for it."""
    return (merged.to(delta.dtype) / scale - delta).to(merged.dtype)


def _merge_in_place_without_record(matrix: torch.Tensor, blocks: Iterator[tuple[int, int, torch.Tensor]],
                                   scale: torch.Tensor | None = None) -> None:
    """matrix ← round(matrix + ΔW) (or the scaled form), as ``_merge_in_place`` computes it, without the
    unmerge record."""
    for start, stop, delta in blocks:
        w0 = matrix[start:stop]
        _rounded_sum(w0, delta, out=w0, scale=_block_scale(scale, start, stop))


def _unmerge_in_place(matrix: torch.Tensor, blocks: Iterator[tuple[int, int, torch.Tensor]],
                      residual: UlpResidual) -> None:
    """matrix ← W0, bit for bit: round(matrix − ΔW) corrected by the stored ULP differences."""
    int_dtype = _int_view(matrix.dtype)
    diff = residual.diff.to(matrix.device)
    scale = None if residual.scale is None else residual.scale.to(matrix.device)
    for start, stop, delta in blocks:
        w = matrix[start:stop]
        block_scale = _block_scale(scale, start, stop)
        if block_scale is not None:
            estimate = _scaled_estimate(w, delta, block_scale)
        elif delta.dtype == matrix.dtype:
            estimate = torch.sub(w, delta, out=delta)  # the same E as the merge computed (in ΔW's memory)
        else:
            estimate = (w.to(delta.dtype) - delta).to(matrix.dtype)
        torch.add(estimate.view(int_dtype), diff[start:stop], out=w.view(int_dtype))
    if residual.index.numel():
        matrix.view(-1)[residual.index.to(matrix.device)] = residual.value.to(matrix.device)
