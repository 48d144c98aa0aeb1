"""Packing (``--packing``): several tokenized examples per row, each seeing only itself.

A micro-batch of B examples (the same B examples, in the same micro-batch, as without packing — so gradient
accumulation and the distributed row split are unchanged) is laid out first-fit decreasing into rows of at
most ``max_length`` tokens instead of B rows padded to the longest. Inside a row:

- ``position_ids`` restart at 0 for each example, so every example sees the positions it would alone;
- attention is block-diagonal and causal: token t of example e attends to the tokens s ≤ t of e only. The
  mask is passed to the model as a 4-D additive float mask ``[rows, 1, L, L]`` (0 = attend, the dtype's
  minimum = blocked), which transformers (5.x) hands unchanged to SDPA and eager attention, for Llama and
  GPT-2 alike; the padding-free ``position_ids``-only path is not used because transformers enables it only
  without a KV cache and with flash-attention-style kernels;
- the first token of each example gets no label (nothing of that example predicts it, exactly as unpacked),
  so no loss term crosses an example boundary.

The loss (:func:`packed_sequence_loss`) is the unpacked one (``sequence_mean_loss`` in ``loop.py``): the mean
over examples of each example's mean cross-entropy over its target tokens. So a packed micro-batch gives the
same loss and the same gradients as the same examples padded, up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

__all__ = ["block_causal_mask", "pack_rows", "packed_collate", "packed_sequence_loss", "packed_loss"]


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of total length ≤ ``max_length``, first-fit decreasing.

    Args:
        lengths: each example's token count (each ≤ ``max_length``).
        max_length: row capacity.

    Returns:
        Rows of example indices; inside a row the examples keep their original order.

    Raises:
        ValueError: an example is longer than ``max_length``.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} are longer than max_length={max_length}; tokenize with the same "
                         "--max-length you pack with")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return [sorted(row) for row in rows]


def packed_collate(batch: Sequence[Mapping[str, Sequence[int]]], max_length: int, pad_id: int) -> dict[str, Any]:
    """Pack tokenized examples into rows (see :func:`pack_rows`).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` and ``attention_mask`` (1 on real tokens), each a
        ``torch.long`` tensor ``[rows, width]`` with ``width`` the longest row. Padding at a row's end has
        ``attention_mask`` 0, label :data:`IGNORE_INDEX` and positions 0, 1, … of its own (so it never joins
        the example before it). :func:`block_causal_mask` builds the attention mask from these.
    """
    if not batch:
        raise ValueError("packed_collate() got an empty batch")
    rows = pack_rows([len(example["input_ids"]) for example in batch], max_length)
    width = max(sum(len(batch[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(batch[i]["input_ids"])
            input_ids[r, at:at + n] = torch.as_tensor(batch[i]["input_ids"], dtype=torch.long)
            labels[r, at + 1:at + n] = torch.as_tensor(batch[i]["labels"][1:], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            attention_mask[r, at:at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, L]`` → the index of each token's example within its row (a new example starts at position 0)."""
    return (position_ids == 0).long().cumsum(dim=1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``[rows, 1, L, L]``: 0 where query t may see key s (same example, s ≤ t),
    ``torch.finfo(dtype).min`` elsewhere."""
    seq = sequence_ids(position_ids)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Mean over the packed examples of each example's mean next-token cross-entropy over its targets.

    logits (rows, L, V), labels and position_ids (rows, L) → scalar. The target at position t+1 belongs
    to the example of t+1 (whose first token carries no label, so no pair crosses examples). Equals
    ``sequence_mean_loss`` of the same examples unpacked.
    """
    return _example_mean_loss(logits[:, :-1], labels[:, 1:], sequence_ids(position_ids)[:, 1:])


def _example_mean_loss(logits: torch.Tensor, targets: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """logits (rows, K, V) predicting ``targets`` (rows, K) of examples numbered ``example`` (rows, K) within
    each row → the mean over examples of their mean cross-entropy (examples without a target skipped)."""
    token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
    # one slot per (row, example); example numbers are < K + 2 within a row
    width = int(example.max()) + 2 if example.numel() else 1
    slot = (example + torch.arange(example.shape[0], device=example.device)[:, None] * width).reshape(-1)
    size = example.shape[0] * width
    is_target = (targets != IGNORE_INDEX).reshape(-1).to(token_loss.dtype)
    sums = torch.zeros(size, dtype=token_loss.dtype, device=logits.device).index_add(0, slot, token_loss)
    counts = torch.zeros(size, dtype=token_loss.dtype, device=logits.device).index_add(0, slot, is_target)
    has = counts > 0
    if not bool(has.any()):
        return token_loss.sum() * 0.0
    return (sums[has] / counts[has]).mean()


def packed_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], keep_logits: bool = False) -> torch.Tensor:
    """Forward a :func:`packed_collate` batch through a causal LM and return :func:`packed_sequence_loss`.

    With ``keep_logits`` (the model's forward takes a ``logits_to_keep`` tensor of positions, transformers ≥
    4.50) the vocabulary projection runs only at the columns where some row has a target next — the same
    saving ``forward_for_loss`` makes for padded batches.
    """
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    positions = batch["position_ids"]
    mask = block_causal_mask(positions, dtype)
    if not keep_logits:
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
        return packed_sequence_loss(out.logits, batch["labels"], positions)
    needed = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0)
    columns = torch.where(needed)[0] if bool(needed.any()) else torch.zeros(1, dtype=torch.long, device=needed.device)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, logits_to_keep=columns)
    return _example_mean_loss(out.logits, batch["labels"][:, columns + 1], sequence_ids(positions)[:, columns + 1])
