"""The training order: seeded epochs, and length grouping that cuts padding without dropping or repeating examples."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lorakit.train.sampling import MEGABATCH_STEPS, data_order, group_by_length


def _padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    return sum(max(lengths[i] for i in order[s:s + batch]) * batch for s in range(0, len(order), batch))


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(11, 72) for _ in range(n)]


def test_without_lengths_the_order_is_the_seeded_permutations() -> None:
    order = data_order(10, seed=3, steps=5, global_batch=3)
    first = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
    second = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + 1)).tolist()
    assert order == (first + second)[:15]


@pytest.mark.parametrize(("n", "batch"), [(640, 8), (101, 8), (37, 5), (12, 16)])
def test_each_epoch_visits_every_example_once(n: int, batch: int) -> None:
    lengths = _lengths(n)
    epochs = 3
    steps = epochs * n // batch
    order = data_order(n, seed=1, steps=steps, global_batch=batch, lengths=lengths)
    assert len(order) == steps * batch
    # Whole epochs are permutations; the cut at steps·batch only drops a tail of the last one.
    for e in range(len(order) // n):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    assert max(Counter(order).values()) <= epochs


def test_grouping_cuts_padding_and_keeps_steps_of_similar_length() -> None:
    n, batch = 640, 8
    lengths = _lengths(n)
    steps = n // batch
    plain = data_order(n, seed=0, steps=steps, global_batch=batch)
    grouped = data_order(n, seed=0, steps=steps, global_batch=batch, lengths=lengths)
    real = sum(lengths)
    assert real / _padded_tokens(plain, lengths, batch) < 0.75  # random batches: ≥ 25 % padding
    assert real / _padded_tokens(grouped, lengths, batch) > 0.95
    # Inside a mega-batch a step holds a contiguous run of the sorted lengths.
    mega = MEGABATCH_STEPS * batch
    for start in range(0, n - n % mega, mega):
        ranked = sorted((lengths[i] for i in grouped[start:start + mega]), reverse=True)
        for s in range(start, start + mega, batch):
            step = sorted((lengths[i] for i in grouped[s:s + batch]), reverse=True)
            k = ranked.index(step[0])
            assert step[-1] >= ranked[min(k + 2 * batch, mega - 1)]


def test_grouped_steps_come_in_random_order_and_depend_on_the_seed() -> None:
    lengths = _lengths(800)
    a = data_order(800, seed=0, steps=100, global_batch=8, lengths=lengths)
    assert a == data_order(800, seed=0, steps=100, global_batch=8, lengths=lengths)  # resume relies on it
    assert a != data_order(800, seed=1, steps=100, global_batch=8, lengths=lengths)
    firsts = [max(lengths[i] for i in a[s:s + 8]) for s in range(0, 400, 8)]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)  # not longest-first


def test_a_partial_last_step_stays_last_so_epochs_keep_step_boundaries() -> None:
    lengths = _lengths(21)
    out = group_by_length(list(range(21)), lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(out) == list(range(21))
    shortest = sorted(range(21), key=lambda i: -lengths[i])[16:]
    assert sorted(out[16:]) == sorted(shortest)


def test_lengths_must_match_the_examples() -> None:
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        data_order(4, seed=0, steps=1, global_batch=2, lengths=[1, 2, 3])
