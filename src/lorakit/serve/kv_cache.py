"""Per-sequence KV caches for a flattened token batch (the serving engine's attention path).

A serving step runs ONE forward over every token that needs computing now: the whole prompt of each newly
admitted request (prefill) and the last sampled token of each running one (decode). The tokens are laid out
as rows of length 1, ``input_ids`` (N, 1) with N = Σ_s T_s, so every linear layer — and lorakit's mixed-batch
LoRA path, one adapter name per row — sees one (N, 1, k) batch, while attention is computed per sequence
against that sequence's own cache:

    for each sequence s with rows [a, b):  o_s = softmax(q_s K_sᵀ · scale + causal) V_s,
    K_s, V_s: (kv_heads, L_s, head_dim), the first L_s = length before the step + T_s positions.

Why this design (measured, see docs/serving.md "KV cache"): a sequence's attention never sees another row,
so no padding enters its softmax and the result for a request does not depend on who else is in the batch;
a request joins or leaves by adding or dropping its own buffers (nothing is re-padded or copied); each
buffer is allocated once for prompt + max_tokens positions, so a step writes in place. The per-sequence
attention itself calls transformers' own ``sdpa_attention_forward`` with the same shapes a single-sequence
``generate`` uses, so it takes the same kernel path.

Wiring: ``RowCache`` implements the one ``Cache`` method attention layers call (``update``), and the
attention function registered as ``"lorakit_rows"`` reads the step's row layout from the cache it is
handed through the forward's keyword arguments (``row_cache=``). The forward receives a 4-D placeholder
``attention_mask``, which transformers passes through unchanged (no mask is built: each sequence's causal
mask is implicit in its own SDPA call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ATTENTION_NAME = "lorakit_rows"


@dataclass
class SequenceCache:
    """One sequence's keys and values for every layer: ``keys[l]`` is (kv_heads, capacity, head_dim)."""

    capacity: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    """Positions filled (the same in every layer between steps)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class Segment:
    """Rows ``start:stop`` of the flattened batch are positions ``cache.length … +T`` of one sequence."""

    cache: SequenceCache
    start: int
    stop: int


class RowCache:
    """The transformers ``Cache`` stand-in for one step: where each row's keys and values go.

    Only what the decoder layers use is implemented (``update``, ``get_seq_length``); the engine builds a
    new one per step from the running sequences' ``SequenceCache`` objects.
    """

    is_compileable = False

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (N, kv_heads, 1, head_dim) keys/values into each sequence's buffers."""
        for seg in self.segments:
            cache = seg.cache
            if len(cache.keys) <= layer_idx:  # first step of this sequence: allocate every layer once
                _, heads, _, dim = key_states.shape
                shape = (heads, cache.capacity, dim)
                cache.keys.append(key_states.new_empty(shape))
                cache.values.append(value_states.new_empty(shape))
            end = cache.length + seg.stop - seg.start
            # (T, kv_heads, 1, d) -> (kv_heads, T, d)
            cache.keys[layer_idx][:, cache.length:end] = key_states[seg.start:seg.stop, :, 0].transpose(0, 1)
            cache.values[layer_idx][:, cache.length:end] = value_states[seg.start:seg.stop, :, 0].transpose(0, 1)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly (position_ids)

    def advance(self) -> None:
        """After the forward: each sequence now holds its T new positions."""
        for seg in self.segments:
            seg.cache.length += seg.stop - seg.start


def rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   row_cache: RowCache | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of each sequence over its own cache. query (N, heads, 1, d) → output (N, 1, heads, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if row_cache is None:
        raise ValueError(f"attention {ATTENTION_NAME!r} runs only inside lorakit's serving engine (no row_cache).")
    layer: int = module.layer_idx  # type: ignore[assignment]
    out = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])
    for seg in row_cache.segments:
        cache = seg.cache
        length = cache.length + seg.stop - seg.start
        q = query[seg.start:seg.stop, :, 0].transpose(0, 1).unsqueeze(0)  # (1, heads, T, d)
        k = cache.keys[layer][:, :length].unsqueeze(0)  # (1, kv_heads, L, d)
        v = cache.values[layer][:, :length].unsqueeze(0)
        o, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling)  # (1, T, heads, d)
        out[seg.start:seg.stop, 0] = o[0]
    return out, None


def register_attention() -> None:
    """Make ``"lorakit_rows"`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, rows_attention)
