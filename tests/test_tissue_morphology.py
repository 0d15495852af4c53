"""Overview morphology (OpenCV labelling and dilation) against dense scipy references, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from slidevl.slide.adipose import _touching
from slidevl.slide.morphology import MAX_CV2_RADIUS, components, dilated
from slidevl.slide.tissue import _components_at_most

EIGHT = np.ones((3, 3), dtype=bool)


def _masks() -> list[np.ndarray]:
    """Random masks of several densities plus the edge cases: empty, full, border-touching, 1-px pieces."""
    rng = np.random.default_rng(7)
    out = [rng.random((53, 71)) < p for p in (0.05, 0.3, 0.55, 0.8)]
    out += [np.zeros((20, 30), dtype=bool), np.ones((20, 30), dtype=bool)]
    border = np.zeros((40, 50), dtype=bool)
    border[0, 5:12] = border[10:30, 0] = border[-1, -1] = border[17, -1] = True  # pieces on all four edges
    border[20, 25] = border[5, 40] = True  # isolated single pixels
    border[8:14, 20:24] = True
    out += [border, ~border, np.ones((1, 9), dtype=bool), np.zeros((9, 1), dtype=bool)]
    diagonal = np.eye(12, dtype=bool)  # joined only through corners: one 8-connected piece
    out += [diagonal, ~diagonal]
    return out


def _components_at_most_reference(mask: np.ndarray, max_px: float, keep_border: bool) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=EIGHT)
    out = np.zeros_like(mask)
    for k in range(1, n + 1):
        piece = labels == k
        on_border = piece[0].any() or piece[-1].any() or piece[:, 0].any() or piece[:, -1].any()
        if piece.sum() <= max_px and not (keep_border and on_border):
            out |= piece
    return out


def test_components_partition_the_mask_as_scipy_does():
    for mask in _masks():
        labels, n = components(mask)
        want, want_n = ndimage.label(mask, structure=EIGHT)
        assert n == want_n and labels.dtype == np.int32
        np.testing.assert_array_equal(labels > 0, mask)
        # The same partition: each of our labels is exactly one of scipy's.
        pairs = np.unique(np.stack([labels[mask], want[mask]]), axis=1)
        assert pairs.shape[1] == n and len(np.unique(pairs[0])) == n and len(np.unique(pairs[1])) == n


@pytest.mark.parametrize("keep_border", [False, True])
@pytest.mark.parametrize("max_px", [0, 1, 3, 40, 10_000])
def test_small_components_match_the_dense_reference(max_px, keep_border):
    for mask in _masks():
        got = _components_at_most(mask, max_px, keep_border=keep_border)
        np.testing.assert_array_equal(got, _components_at_most_reference(mask, max_px, keep_border))


def test_touching_matches_the_dense_reference():
    rng = np.random.default_rng(3)
    for mask in _masks():
        for anchor in (rng.random(mask.shape) < 0.02, np.zeros_like(mask), np.ones_like(mask), mask.copy()):
            labels, n = ndimage.label(mask, structure=EIGHT)
            want = np.isin(labels, labels[anchor & mask]) & mask
            got = _touching(mask, anchor)
            np.testing.assert_array_equal(got, want)
            assert got is not mask  # callers may write into the result


@pytest.mark.parametrize("radius", [0, 1, 2, MAX_CV2_RADIUS, MAX_CV2_RADIUS + 1, 6, 13])
def test_dilation_matches_scipy_with_a_disk(radius):
    for mask in _masks():
        want = ndimage.binary_dilation(mask, structure=disk(radius).astype(bool)) if radius else mask
        got = dilated(mask, radius)
        assert got.dtype == bool and got.shape == mask.shape
        np.testing.assert_array_equal(got, want)


def test_non_contiguous_and_wrong_masks():
    mask = np.random.default_rng(1).random((30, 40)) < 0.4
    np.testing.assert_array_equal(dilated(mask[:, ::2], 2), dilated(np.ascontiguousarray(mask[:, ::2]), 2))
    with pytest.raises(ValueError, match="2-D bool mask"):
        components(mask.astype(np.uint8))


@pytest.mark.parametrize("block", [1, 4, 7, 16])
def test_block_reductions_match_a_dense_reference(block):
    from slidevl.slide.membranes import block_any, block_sum

    for mask in _masks():
        h, w = mask.shape
        gh, gw = -(-h // block), -(-w // block)  # partial blocks at the bottom and right edges
        cells = [[mask[i * block : (i + 1) * block, j * block : (j + 1) * block] for j in range(gw)] for i in range(gh)]
        np.testing.assert_array_equal(block_any(mask, block), [[c.any() for c in row] for row in cells])
        np.testing.assert_array_equal(block_sum(mask, block), [[c.sum() for c in row] for row in cells])
