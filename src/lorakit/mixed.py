"""Mixed-adapter batches: row i of a batch goes through adapter ``adapter_names[i]`` in every layer.

The wrapper builds one ``BatchPlan`` per forward (or per ``generate`` call) and every LoRA layer applies
it to its base output. Rows named ``"__base__"`` get no adapter, nor do rows whose adapter does not adapt
that layer.

Vectorised path (inference): each layer's adapters are stacked once into A (S+1, r_max, k) and
s·Bᵀ (S+1, r_max, d) — zero-padded to the largest rank, the last slot all zeros — and cached until an
adapter of that layer is added, removed, rescaled or has its weights changed (checked through the
factors' version counters). The plan maps each row to a slot once per distinct set of adapter names, so
a layer costs two ``index_select`` and two ``bmm`` (``lorakit.ops.gathered_lora_linear``) whatever the
number of adapters or rows: no Python loop over adapters. At decode (fewer tokens per row than the rank),
when the rows fill the stack's slots lo..hi-1 equally (one row per adapter, say), the rows are permuted
into slot order instead and the stacks' slice is used in place (``ops.segmented_lora_linear``): moving
T·(k + d) numbers per row instead of copying r·(k + d) of weights.

Training through a mixed batch (a gradient must reach some adapter's factors) uses the same kernels on
stacks built afresh, differentiably, for that forward. Per-adapter loop (the fallback): when an
adapter's dropout is active (training mode), for ``nn.Conv1d/2d`` layers, for embeddings with
``max_norm``, and for layers where a row's adapter is a DoRA one (it rescales that row's base output). Each adapter's rows are then selected, run through ``lora_output`` and added back.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from . import ops
from .layers.base import BASE_ROW, LoraLayer
from .layers.embedding import Embedding
from .layers.linear import Linear


@dataclass
class StackedFactors:
    """All adapters of one layer, stacked for gathered kernels; ``names[i]`` is slot i, slot S is zero."""

    names: tuple[str, ...]
    a: torch.Tensor  # Linear: (S+1, r_max, k); Embedding: ((S+1)·vocab, r_max), slot s at rows s·vocab…
    bt: torch.Tensor  # (S+1, r_max, d), scale folded in
    dropout_names: tuple[str, ...] = ()  # adapters with dropout p > 0 (active in training mode)
    fingerprint: tuple = field(default=(), repr=False)


_STACKS: weakref.WeakKeyDictionary[LoraLayer, StackedFactors] = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Drop every cached stack (rebuilt on the next mixed batch). Needed only after changing factors in a
    way autograd's version counters do not see (``param.data.add_(…)``); optimizer steps,
    ``load_state_dict``, ``copy_`` under ``no_grad`` and new/deleted adapters are detected."""
    _STACKS.clear()


def _factor_tensors(layer: LoraLayer) -> list[torch.Tensor]:
    """[A, B] of every adapter in ``layer.scaling`` order, read straight from the containers' dicts (the
    hot path runs this once per layer and forward, for every loaded adapter)."""
    if isinstance(layer, Embedding):
        pa, pb = layer.lora_embedding_A._parameters, layer.lora_embedding_B._parameters
        return [t for n in layer.scaling for t in (pa[n], pb[n])]  # type: ignore[misc]
    ma, mb = layer.lora_A._modules, layer.lora_B._modules
    return [t for n in layer.scaling for t in (ma[n]._parameters["weight"], mb[n]._parameters["weight"])]


def _fingerprint(layer: LoraLayer, tensors: list[torch.Tensor]) -> tuple:
    """What the stacks depend on: names, ranks, scales, and each factor's identity, version and storage
    (``.to()`` swaps ``param.data`` without a version bump; the storage pointer catches it)."""
    return (tuple(layer.scaling.items()), tuple(layer.r.items()),
            tuple([(id(t), t._version, t.data_ptr()) for t in tensors]))


def stacked_factors(layer: LoraLayer) -> StackedFactors:
    """The cached stacks of ``layer``'s adapters (no autograd), rebuilt if anything they depend on changed."""
    fingerprint = _fingerprint(layer, _factor_tensors(layer))
    cached = _STACKS.get(layer)
    if cached is not None and cached.fingerprint == fingerprint:
        return cached
    with torch.no_grad():
        stacks = build_stacks(layer)
    stacks.fingerprint = fingerprint
    _STACKS[layer] = stacks
    return stacks


def build_stacks(layer: LoraLayer, trainable: frozenset[str] = frozenset()) -> StackedFactors:
    """Stack every adapter of ``layer`` (see ``StackedFactors``). Gradients reach the factors of the
    adapters named in ``trainable`` (through the slice copies); the others are copied detached."""
    names = tuple(layer.scaling)
    r_max = max(layer.r[n] for n in names)
    a0, b0 = layer.factors(names[0])
    slots = len(names) + 1
    embedding = isinstance(layer, Embedding)
    vocab = a0.shape[1]
    a = a0.new_zeros(slots * vocab, r_max) if embedding else a0.new_zeros(slots, r_max, a0.shape[1])
    bt = b0.new_zeros(slots, r_max, b0.shape[0])
    for i, name in enumerate(names):
        fa, fb = layer.factors(name)
        if name not in trainable:
            fa, fb = fa.detach(), fb.detach()
        r = layer.r[name]
        if embedding:
            a[i * vocab:(i + 1) * vocab, :r] = fa.t()
        else:
            a[i, :r] = fa
        bt[i, :r] = fb.t() * layer.scaling[name]
    dropout_names = tuple(n for n in names if getattr(layer.lora_dropout[n], "p", 0.0) > 0)
    return StackedFactors(names, a, bt, dropout_names)


@dataclass
class BatchPlan:
    """Rows of a batch grouped by adapter name: ``groups[name]`` is a LongTensor of row indices."""

    adapter_names: list[str]
    groups: dict[str, torch.Tensor]
    device: torch.device | None = None
    # slot names of a stack -> (N,) slot per row; most layers share one set of names, so few entries.
    _rows: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    # id(layer) -> that layer's cached stacks, checked once per plan: a generate call applies the same plan
    # to every layer at every step, and the factors cannot change in between (no optimizer step inside).
    _stacks: dict[int, StackedFactors] = field(default_factory=dict, repr=False)
    # slot names -> (perm, lo, hi) when rows fill slots lo..hi-1 equally (see ops.segmented_lora_linear)
    _segments: dict[tuple[str, ...], tuple[torch.Tensor, int, int] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, adapter_names: list[str], device: torch.device | None = None) -> BatchPlan:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(i)
        groups = {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in rows.items() if n != BASE_ROW}
        return cls(list(adapter_names), groups, device)

    def __len__(self) -> int:
        return len(self.adapter_names)

    def slot_rows(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """(N,) index of each row's adapter in ``names``; ``len(names)`` (the zero slot) if absent."""
        rows = self._rows.get(names)
        if rows is None:
            position = {n: i for i, n in enumerate(names)}
            rows = torch.tensor([position.get(n, len(names)) for n in self.adapter_names], dtype=torch.long,
                                device=device)
            self._rows[names] = rows
        return rows if rows.device == device else rows.to(device)

    def segments(self, names: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, int, int] | None:
        """(perm, lo, hi) if the rows, sorted by slot (``perm``), fill slots lo..hi-1 with equally many rows
        each — then a layer can use its stacks' slice in place; None otherwise."""
        if names not in self._segments:
            position = {n: i for i, n in enumerate(names)}
            slots = [position.get(n, len(names)) for n in self.adapter_names]
            counts: dict[int, int] = {}
            for slot in slots:
                counts[slot] = counts.get(slot, 0) + 1
            lo, hi = min(counts), max(counts) + 1
            uniform = len(counts) == hi - lo and len(set(counts.values())) == 1
            perm = sorted(range(len(slots)), key=slots.__getitem__)
            self._segments[names] = (torch.tensor(perm, dtype=torch.long, device=device), lo, hi) if uniform else None
        found = self._segments[names]
        if found is not None and found[0].device != device:
            found = (found[0].to(device), found[1], found[2])
        return found

    def apply(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (N, ...) from the base layer → result with each row's adapter added."""
        if x.shape[0] != len(self):
            raise ValueError(
                f"adapter_names has {len(self)} entries but the batch reaching {type(layer).__name__} has "
                f"{x.shape[0]} rows; give one adapter name per row (num_beams/num_return_sequences > 1 "
                "multiply rows: repeat the names accordingly)."
            )
        used = [name for name in self.groups if name in layer.r]
        if not used:
            return result  # every row is "__base__" or uses an adapter this layer does not have
        embedding = isinstance(layer, Embedding)
        if not (isinstance(layer, Linear) or embedding) or (embedding and layer.base_layer.max_norm is not None):
            return self._apply_loop(layer, x, result, used)  # nn.Conv1d/2d, renormalised embeddings
        if layer.lora_variant and not layer.lora_variant.keys().isdisjoint(used):
            return self._apply_loop(layer, x, result, used)  # DoRA rescales each row's base output
        stacks = self._stacks.get(id(layer))
        if stacks is None:
            stacks = self._stacks[id(layer)] = stacked_factors(layer)
        if any(layer.lora_dropout[n].training for n in stacks.dropout_names if n in self.groups):
            return self._apply_loop(layer, x, result, used)  # per-adapter dropout probabilities
        if torch.is_grad_enabled():
            trainable = frozenset(n for n in used if any(f.requires_grad for f in layer.factors(n)))
            if trainable:  # training through a mixed batch: stacks built afresh, differentiable
                stacks = build_stacks(layer, trainable)
        if not embedding and x.numel() // max(x.shape[0] * x.shape[-1], 1) < stacks.a.shape[1]:
            # fewer tokens per row than the rank (decode): permuting rows beats gathering weights
            segments = self.segments(stacks.names, x.device)
            if segments is not None:
                return ops.segmented_lora_linear(x, result, stacks.a, stacks.bt, *segments)
        rows = self.slot_rows(stacks.names, x.device)
        if embedding:
            vocab = layer.base_layer.weight.shape[0]
            return ops.gathered_lora_embedding(x, result, stacks.a, stacks.bt, rows, vocab)
        return ops.gathered_lora_linear(x, result, stacks.a, stacks.bt, rows)

    def _apply_loop(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, used: list[str]) -> torch.Tensor:
        for name in used:
            rows = self.groups[name].to(x.device)
            delta = layer.adapter_output(x.index_select(0, rows), name, result.index_select(0, rows))
            result = result.index_add(0, rows, delta)
        return result
