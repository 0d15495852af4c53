"""Batched texture statistics: grey-level co-occurrence matrices and uniform LBP.

scikit-image computes both one image at a time in compiled loops; calling it per tile
costs far more than the tiles take to read. Here the whole batch is handled with array
shifts and one ``np.bincount`` per offset. Conventions follow scikit-image (offsets
``(round(sin(a) d), round(cos(a) d))``, symmetric counts, its property formulas, its
LBP sampling and bilinear interpolation), so results equal ``graycomatrix`` /
``graycoprops`` and, but for rare float ties, ``local_binary_pattern(method="uniform")``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")


def glcm_offsets(distances: Sequence[int], angles: Sequence[float]) -> list[tuple[int, int]]:
    """(row, col) pixel offsets for each distance x angle, distance-major, as scikit-image."""
    return [(int(round(math.sin(a) * d)), int(round(math.cos(a) * d))) for d in distances for a in angles]


def glcm_counts(
    levels_img: np.ndarray, levels: int, offsets: Sequence[tuple[int, int]], *, symmetric: bool = True
) -> np.ndarray:
    """Co-occurrence counts ``(B, K, L, L)`` of a quantised batch ``(B, H, W)``.

    ``P[b, k, i, j]`` counts pixel pairs with level ``i`` at ``(r, c)`` and level ``j``
    at ``(r + dr_k, c + dc_k)``; ``symmetric`` adds the transpose.
    """
    b, h, w = levels_img.shape
    if levels_img.size and int(levels_img.max()) >= levels:
        raise ValueError(f"quantised image has a level >= levels={levels}")
    ll = levels * levels
    # Row-level index plus a per-tile base, computed once; each offset adds its column level.
    # intp indices avoid the copy np.bincount makes of any other integer type.
    left = levels_img.astype(np.intp) * levels + (np.arange(b, dtype=np.intp) * ll)[:, None, None]
    out = np.empty((b, len(offsets), levels, levels), dtype=np.int64)
    for k, (dr, dc) in enumerate(offsets):
        r0, r1 = max(0, -dr), h - max(0, dr)
        c0, c1 = max(0, -dc), w - max(0, dc)
        idx = left[:, r0:r1, c0:c1] + levels_img[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        out[:, k] = np.bincount(idx.ravel(), minlength=b * ll).reshape(b, levels, levels)
    if symmetric:
        out += out.swapaxes(-1, -2)
    return out


def glcm_properties(counts: np.ndarray) -> dict[str, np.ndarray]:
    """scikit-image's ``graycoprops`` for every matrix of ``counts (..., L, L)`` at once."""
    p = counts.astype(np.float64)
    total = p.sum(axis=(-2, -1), keepdims=True)
    total[total == 0] = 1
    p /= total
    levels = p.shape[-1]
    i = np.arange(levels, dtype=np.float64)[:, None]
    j = np.arange(levels, dtype=np.float64)[None, :]
    diff = i - j
    props = {
        "contrast": (p * diff**2).sum(axis=(-2, -1)),
        "dissimilarity": (p * np.abs(diff)).sum(axis=(-2, -1)),
        "homogeneity": (p / (1.0 + diff**2)).sum(axis=(-2, -1)),
        "energy": np.sqrt((p**2).sum(axis=(-2, -1))),
    }
    mean_i = (p * i).sum(axis=(-2, -1))
    mean_j = (p * j).sum(axis=(-2, -1))
    di = i - mean_i[..., None, None]
    dj = j - mean_j[..., None, None]
    std_i = np.sqrt((p * di**2).sum(axis=(-2, -1)))
    std_j = np.sqrt((p * dj**2).sum(axis=(-2, -1)))
    cov = (p * di * dj).sum(axis=(-2, -1))
    # scikit-image defines a constant image's correlation as 1.
    flat = (std_i < 1e-15) | (std_j < 1e-15)
    props["correlation"] = np.where(flat, 1.0, cov / np.where(flat, 1.0, std_i * std_j))
    logp = np.log(p, where=p > 0, out=np.zeros_like(p))
    props["entropy"] = -(p * logp).sum(axis=(-2, -1))
    return props


def _shift(img: np.ndarray, dr: int, dc: int, m: int) -> np.ndarray:
    """The interior window of ``img`` (margin ``m``) displaced by ``(dr, dc)``."""
    h, w = img.shape[-2:]
    return img[..., m + dr : h - m + dr, m + dc : w - m + dc]


def uniform_lbp(gray: np.ndarray, points: int = 8, radius: float = 1.0) -> np.ndarray:
    """Rotation-invariant uniform LBP codes (0..points+1) of the interior of ``gray (B, H, W)``.

    Samples and interpolation follow scikit-image (points at ``(-R sin, R cos)`` rounded
    to 5 decimals, bilinear), but the interpolation is evaluated in float32 as
    ``a + t (b - a)``, three times faster than float64 and exact on flat neighbourhoods,
    where equal neighbours must count as ">= centre". Only an exact tie between unequal
    neighbours (which float rounding decides either way) can differ from scikit-image.
    The border of ``ceil(radius)`` pixels is dropped rather than zero-padded, so tile
    edges add no spurious patterns.
    """
    m = math.ceil(radius)
    h, w = gray.shape[-2:]
    if h <= 2 * m or w <= 2 * m:
        raise ValueError(f"image {h}x{w} too small for LBP radius {radius}")
    img = gray.astype(np.float32)
    centre = _shift(img, 0, 0, m)
    ones = np.zeros(centre.shape, dtype=np.uint8)
    changes = np.zeros(centre.shape, dtype=np.uint8)
    top = np.empty(centre.shape, dtype=np.float32)
    bottom = np.empty(centre.shape, dtype=np.float32)
    previous = None
    for k in range(points):
        rp = round(-radius * math.sin(2 * math.pi * k / points), 5)
        cp = round(radius * math.cos(2 * math.pi * k / points), 5)
        r_lo, r_hi, c_lo, c_hi = math.floor(rp), math.ceil(rp), math.floor(cp), math.ceil(cp)
        if r_lo == r_hi and c_lo == c_hi:
            bit = _shift(img, r_lo, c_lo, m) >= centre
        else:
            dr, dc = np.float32(rp - r_lo), np.float32(cp - c_lo)
            a, c = _shift(img, r_lo, c_lo, m), _shift(img, r_hi, c_lo, m)
            np.subtract(_shift(img, r_lo, c_hi, m), a, out=top)
            top *= dc
            top += a
            np.subtract(_shift(img, r_hi, c_hi, m), c, out=bottom)
            bottom *= dc
            bottom += c
            bottom -= top
            bottom *= dr
            bottom += top
            bit = bottom >= centre
        ones += bit
        # scikit-image counts 0/1 changes between consecutive samples without wrapping
        # around; circular change counts are even, so uniformity is decided the same way.
        if previous is not None:
            changes += previous != bit
        previous = bit
    return np.where(changes <= 2, ones, np.uint8(points + 1))


def code_histogram(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Per-image normalised histogram ``(B, n_codes)`` of integer codes ``(B, ...)``."""
    b = codes.shape[0]
    flat = codes.reshape(b, -1).astype(np.int64) + (np.arange(b, dtype=np.int64) * n_codes)[:, None]
    hist = np.bincount(flat.ravel(), minlength=b * n_codes).reshape(b, n_codes).astype(np.float64)
    return hist / max(codes[0].size, 1)
