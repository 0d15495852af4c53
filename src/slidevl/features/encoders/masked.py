"""Per-tile statistics over a pixel mask, vectorised over a batch and its channels.

Stain statistics are taken over tissue pixels only, whose number differs per tile, so
``np.percentile`` cannot be applied to a rectangular batch and ``np.nanpercentile``
loops in Python. Instead masked-out values become NaN, one sort along the pixel axis
pushes them to the end, and each tile's percentiles are read at positions scaled to its
own count, with the same linear interpolation as ``np.percentile``. Sums use ``einsum``
with the mask as 0/1 weights, which makes no temporaries. Empty tiles get 0.

Shapes: ``values (B, K, N)`` (K channels of N pixels), ``mask (B, N)`` boolean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def masked_moments(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std ``(B, K)`` of each channel over the mask."""
    weights = mask.astype(values.dtype)
    n = np.maximum(mask.sum(axis=1), 1)[:, None]
    mean = np.einsum("bkn,bn->bk", values, weights, dtype=np.float64) / n
    # Centre before squaring: float32 E[x^2] - E[x]^2 would cancel badly for small stds.
    centred = values - mean[:, :, None].astype(values.dtype)
    var = np.einsum("bkn,bkn,bn->bk", centred, centred, weights, dtype=np.float64) / n
    return mean, np.sqrt(var)


def masked_percentiles(values: np.ndarray, mask: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Percentiles ``(B, K, len(qs))`` of each channel over the mask."""
    # Adding NaN off the mask is one fast float op, unlike a boolean select per channel.
    nan_off = np.where(mask, np.float32(0), np.float32(np.nan))
    ordered = np.sort(values + nan_off[:, None, :], axis=2)
    count = mask.sum(axis=1)
    last = np.maximum(count - 1, 0)[:, None, None]
    pos = np.asarray(qs, dtype=np.float64)[None, None, :] / 100.0 * last
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, last)
    k = values.shape[1]
    v_lo = np.take_along_axis(ordered, np.broadcast_to(lo, (len(count), k, len(qs))), axis=2).astype(np.float64)
    v_hi = np.take_along_axis(ordered, np.broadcast_to(hi, (len(count), k, len(qs))), axis=2).astype(np.float64)
    out = v_lo + (v_hi - v_lo) * (pos - lo)
    return np.where((count > 0)[:, None, None], out, 0.0)


def masked_corr(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray, moments_a: tuple[np.ndarray, np.ndarray], moments_b: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Pearson correlation ``(B,)`` of ``a (B, N)`` and ``b (B, N)`` over the mask, from their moments.

    0 where a standard deviation vanishes.
    """
    n = np.maximum(mask.sum(axis=1), 1)
    (mean_a, std_a), (mean_b, std_b) = moments_a, moments_b
    da = a - mean_a[:, None].astype(a.dtype)
    db = b - mean_b[:, None].astype(b.dtype)
    cov = np.einsum("bn,bn,bn->b", da, db, mask.astype(a.dtype), dtype=np.float64) / n
    denom = std_a * std_b
    return np.where(denom > 1e-12, cov / np.where(denom > 1e-12, denom, 1), 0.0)
