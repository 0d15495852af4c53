"""Procedural H&E-like tiles of known tissue class, for encoder checks and benchmarks.

Tiles are rendered through the same Beer-Lambert model that colour deconvolution
inverts: hematoxylin and eosin density maps are drawn per class, mixed with the
Ruifrok-Johnston stain vectors and turned into transmitted light, then noised. The
whole-slide synthetic cohorts live in :mod:`slidevl.synth`; these are single tiles.

Classes:

* ``tumour``: crowded round dark nuclei in lightly eosin-stained cytoplasm;
* ``stroma``: oriented eosin-dense fibre streaks with a few thin nuclei;
* ``background``: near-white glass with faint debris.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve
from skimage.color import rgb_from_hed

TILE_CLASSES = ("tumour", "stroma", "background")


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2 <= radius**2).astype(np.float32)


def _blobs(rng: np.random.Generator, n: int, size: int, count: tuple[int, int], radius: float) -> np.ndarray:
    """``(n, size, size)`` maps in [0, 1] with ``count`` random discs per tile."""
    impulses = np.zeros((n, size, size), dtype=np.float32)
    for i, k in enumerate(rng.integers(count[0], count[1] + 1, size=n)):
        ys, xs = rng.integers(0, size, size=(2, k))
        impulses[i, ys, xs] = rng.uniform(0.7, 1.0, size=k)
    blobs = fftconvolve(impulses, _disc(radius)[None], mode="same", axes=(1, 2))
    return np.clip(blobs, 0, 1.2)


def _field(rng: np.random.Generator, n: int, size: int, sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-ish random field per tile."""
    noise = gaussian_filter(rng.standard_normal((n, size, size)).astype(np.float32), sigma=(0, sigma, sigma))
    return noise / (noise.std(axis=(1, 2), keepdims=True) + 1e-6)


def _render(h: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Transmitted-light RGB uint8 ``(n, H, W, 3)`` from stain densities (decadic OD)."""
    od = h[..., None] * rgb_from_hed[0] + e[..., None] * rgb_from_hed[1]
    rgb = 255.0 * np.power(10.0, -od)
    rgb += rng.normal(0, 3.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def synthetic_tiles(kind: str, n: int, size: int = 256, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n`` uint8 RGB tiles ``(n, size, size, 3)`` of class ``kind`` (see module docstring)."""
    if kind not in TILE_CLASSES:
        raise ValueError(f"unknown synthetic tile class {kind!r}; choose one of {TILE_CLASSES}")
    rng = np.random.default_rng(seed)
    scale = size / 256
    stain = rng.uniform(0.8, 1.2, size=(n, 1, 1)).astype(np.float32)
    if kind == "tumour":
        nuclei = _blobs(rng, n, size, (int(70 * scale**2), int(110 * scale**2)), 7.0 * scale)
        nuclei = gaussian_filter(nuclei, sigma=(0, scale, scale))
        h = stain * (0.06 + 0.85 * nuclei)
        e = stain * (0.30 + 0.05 * _field(rng, n, size, 6 * scale)) * (1 - 0.5 * np.clip(nuclei, 0, 1))
    elif kind == "stroma":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta = rng.uniform(0, np.pi, size=(n, 1, 1))
        period = rng.uniform(10, 16, size=(n, 1, 1)) * scale
        along = xx * np.cos(theta) + yy * np.sin(theta)
        waves = np.sin(2 * np.pi * along / period + 1.5 * _field(rng, n, size, 12 * scale))
        fibres = np.clip(waves, 0, 1) ** 2
        nuclei = _blobs(rng, n, size, (2, 6), 3.0 * scale)
        h = stain * (0.03 + 0.6 * np.clip(nuclei, 0, 1))
        e = stain * (0.18 + 0.45 * fibres)
    else:
        debris = _blobs(rng, n, size, (0, 3), 2.0 * scale)
        h = 0.004 + 0.15 * debris
        e = 0.008 + 0.1 * debris + 0.004 * _field(rng, n, size, 20 * scale)
    return _render(np.clip(h, 0, None), np.clip(e, 0, None), rng)
