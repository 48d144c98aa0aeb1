"""The order in which training examples are visited: seeded epochs, optionally grouped by length.

A step's micro-batch is padded to its longest example, so a step that mixes a 12-token and a 70-token
review spends most of its compute on padding: on the default task (reviews of 11–72 tokens, batch 8)
random batches are 31 % padding. ``group_by_length`` (transformers' ``group_by_length`` idea, on by
default in ``lorakit train``) sorts each run of ``MEGABATCH_STEPS`` steps by length and shuffles the
resulting steps, so a step holds examples of similar length (1.5 % padding there) while every epoch
still visits each example once, in an order that stays random at the scale of the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MEGABATCH_STEPS = 50
"""Steps whose examples are sorted together (transformers' LengthGroupedSampler uses mega-batches of 50)."""


def data_order(n: int, seed: int, steps: int, global_batch: int,
               lengths: Sequence[int] | None = None) -> list[int]:
    """Example indices for the whole run: seeded permutations of ``range(n)``, one per epoch, concatenated
    and cut to ``steps · global_batch``; step ``s`` takes ``order[s·G:(s+1)·G]``, G = ``global_batch``.

    With ``lengths`` (one per example) each epoch's permutation is regrouped by :func:`group_by_length`,
    keeping the step boundaries where they are (an epoch that starts inside a step first completes it).
    The same arguments always give the same order, which is what resuming from a checkpoint relies on.
    """
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"data_order got {len(lengths)} lengths for {n} examples")
    needed = steps * global_batch
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        permutation = torch.randperm(n, generator=generator).tolist()
        if lengths is not None:
            fill = (-len(order)) % global_batch  # rows that complete the step the last epoch left open
            permutation = permutation[:fill] + group_by_length(permutation[fill:], lengths, global_batch, generator)
        order.extend(permutation)
        epoch += 1
    return order[:needed]


def group_by_length(indices: Sequence[int], lengths: Sequence[int], global_batch: int,
                    generator: torch.Generator) -> list[int]:
    """``indices`` reordered so that each run of ``global_batch`` holds examples of similar length.

    The indices are cut into mega-batches of ``MEGABATCH_STEPS · global_batch``; each is sorted by length
    (longest first, ties in their random order) and cut into steps, and the full steps are shuffled with
    ``generator``. A last partial step (fewer than ``global_batch`` indices) stays last, so the caller's
    step boundaries do not move. Returns a permutation of ``indices``.
    """
    size = MEGABATCH_STEPS * global_batch
    grouped: list[int] = []
    for start in range(0, len(indices), size):
        mega = sorted(indices[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep random order
        full = len(mega) // global_batch
        steps = [mega[k * global_batch:(k + 1) * global_batch] for k in range(full)]
        for k in torch.randperm(full, generator=generator).tolist():
            grouped.extend(steps[k])
        grouped.extend(mega[full * global_batch:])  # only the last mega-batch can leave a partial step
    return grouped
