"""The training loop's epoch order: a seeded permutation, optionally grouped by sequence length."""

from __future__ import annotations

import random

import pytest

from slidevl.slidellm.tuning.loop import GROUP_SPAN_BATCHES, EpochSampler


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _padded(order: list[int], lengths: list[int], size: int) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in _batches(order, size))


@pytest.mark.parametrize("n", [1, 7, 8, 803, 1600])
def test_grouped_order_is_a_seeded_permutation_of_length_sorted_batches(n: int) -> None:
    rng = random.Random(n)
    lengths = [rng.randint(20, 300) for _ in range(n)]
    size = 8
    sampler = EpochSampler(n, seed=3, lengths=lengths, batch_size=size)
    first = list(sampler)
    assert sorted(first) == list(range(n))
    assert list(sampler) == first  # (seed, epoch) alone decide the order
    sampler.set_epoch(1)
    if n > size:
        assert list(sampler) != first
    batches = _batches(first, size)
    # Only the last batch may be short, so the loader cuts the order into the sampler's batches.
    assert all(len(b) == size for b in batches[:-1])
    plain = list(EpochSampler(n, seed=3))
    assert _padded(first, lengths, size) <= _padded(plain, lengths, size)
    if n >= 800:
        assert _padded(first, lengths, size) < 1.1 * sum(lengths) < _padded(plain, lengths, size)


def test_plain_order_is_unchanged_by_batch_size() -> None:
    assert list(EpochSampler(50, seed=1)) == list(EpochSampler(50, seed=1, batch_size=8))


def test_lengths_must_match_the_records() -> None:
    with pytest.raises(ValueError, match="3 lengths for 4 records"):
        EpochSampler(4, seed=0, lengths=[1, 2, 3])
