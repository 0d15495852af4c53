"""Noise primitives for the synthetic slides: smooth value noise and periodic textures.

Two kinds of noise are needed and they have different constraints:

* Layout fields (where the tissue, tumour and fat are) cover a whole slide at a coarse
  resolution and must not repeat; :func:`value_noise` upsamples a small random grid,
  which costs O(pixels) whatever the feature size (a wide Gaussian filter would not).
* Texture banks (what stroma or tumour looks like at 20x) are rendered once per cohort
  and then sampled with wrap-around at any offset, so they must tile seamlessly;
  :func:`periodic_noise` filters white noise in the Fourier domain, which is periodic
  by construction, and :func:`periodic_worley` builds cellular (Voronoi) structure on
  a torus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage


def value_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise with features about ``scale`` pixels wide, zero mean, unit variance.

    A random grid with one value per ``scale`` pixels is lightly blurred and upsampled
    with cubic splines, so the cost is linear in the output size.
    """
    h, w = shape
    scale = max(float(scale), 1.0)
    gh = int(np.ceil(h / scale)) + 4
    gw = int(np.ceil(w / scale)) + 4
    grid = ndimage.gaussian_filter(rng.standard_normal((gh, gw)).astype(np.float32), 0.6, mode="wrap")
    # Map output pixel centres onto grid coordinates (offset 1.5 keeps splines away
    # from the grid border, where the cubic fit is poorest).
    ys = (np.arange(h, dtype=np.float32) + 0.5) / scale + 1.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) / scale + 1.5
    coords = np.meshgrid(ys, xs, indexing="ij")
    out = ndimage.map_coordinates(grid, coords, order=3, mode="nearest").astype(np.float32)
    return _standardise(out)


def fractal_noise(
    shape: tuple[int, int], scale: float, rng: np.random.Generator, octaves: int = 3, persistence: float = 0.5
) -> np.ndarray:
    """Sum of :func:`value_noise` octaves (scale, scale/2, ...), standardised."""
    out = np.zeros(shape, np.float32)
    amp = 1.0
    for k in range(octaves):
        out += amp * value_noise(shape, scale / (2**k), rng)
        amp *= persistence
    return _standardise(out)


def periodic_noise(
    size: int,
    rng: np.random.Generator,
    sigma: float,
    sigma_across: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Seamlessly tiling Gaussian-filtered noise on a ``size`` x ``size`` torus.

    ``sigma`` is the feature size in pixels. With ``sigma_across`` the filter is
    anisotropic: features are ``sigma`` long along direction ``angle`` (radians, image
    x axis towards y) and ``sigma_across`` wide, which gives fibre-like streaks.
    """
    white = rng.standard_normal((size, size), dtype=np.float32)
    # scipy.fft keeps float32 in single precision (numpy's FFT would upcast).
    f = fft.rfft2(white)
    ky = (np.fft.fftfreq(size) * 2 * np.pi).astype(np.float32)
    kx = (np.fft.rfftfreq(size) * 2 * np.pi).astype(np.float32)
    if sigma_across is None:
        # Isotropic: the Gaussian gain is separable, an outer product of two vectors.
        gain = np.exp(-0.5 * ky**2 * sigma**2)[:, None] * np.exp(-0.5 * kx**2 * sigma**2)[None, :]
    else:
        ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        k_along = kx[None, :] * ca + ky[:, None] * sa
        k_across = ky[:, None] * ca - kx[None, :] * sa
        gain = np.exp(-0.5 * (k_along**2 * np.float32(sigma**2) + k_across**2 * np.float32(sigma_across**2)))
    f *= gain
    out = fft.irfft2(f, s=(size, size)).astype(np.float32)
    return _standardise(out)


@dataclass(frozen=True)
class Worley:
    """Cellular structure on a periodic square: the nearest and second-nearest seed.

    ``dx``/``dy`` point from the nearest seed to the pixel (wrapped), ``f1``/``f2`` are
    the distances to the nearest and second-nearest seeds, ``id1``/``id2`` their
    indices into ``seeds`` (an (n, 2) array of x, y positions) and ``gap`` the distance
    from the pixel to the bisector between the two seeds, i.e. to the cell wall.
    """

    seeds: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    f1: np.ndarray
    f2: np.ndarray
    id1: np.ndarray
    id2: np.ndarray
    gap: np.ndarray


def periodic_worley(size: int, cell: float, rng: np.random.Generator, jitter: float = 0.85, chunk: int = 128) -> Worley:
    """Jittered-grid Voronoi cells of about ``cell`` pixels on a ``size`` torus.

    The seed lattice has ``round(size / cell)`` cells per side so it wraps exactly.
    Each pixel checks the seeds of its own and the 8 neighbouring lattice cells; with
    jitter < 1 that finds the true nearest seed in all but rare corner cases.
    """
    g = max(3, int(round(size / cell)))
    cell = size / g
    gy, gx = np.mgrid[0:g, 0:g]
    sx = (gx + 0.5 + jitter * (rng.random((g, g)) - 0.5)) * cell
    sy = (gy + 0.5 + jitter * (rng.random((g, g)) - 0.5)) * cell
    seeds = np.stack([sx.ravel(), sy.ravel()], axis=1).astype(np.float32)

    # Pad the lattice by one cell on every side with wrapped copies shifted by one
    # period, so neighbour lookups need no modulo on coordinates.
    wrap = np.r_[g - 1, np.arange(g), 0]
    shift = np.r_[-size, np.zeros(g), size].astype(np.float32)
    psx = sx.astype(np.float32)[np.ix_(wrap, wrap)] + shift[None, :]
    psy = sy.astype(np.float32)[np.ix_(wrap, wrap)] + shift[:, None]
    pid = (gy * g + gx).astype(np.int32)[np.ix_(wrap, wrap)]

    shape = (size, size)
    f1_out = np.empty(shape, np.float32)
    f2_out = np.empty(shape, np.float32)
    id1_out = np.empty(shape, np.int32)
    id2_out = np.empty(shape, np.int32)
    dx_out = np.empty(shape, np.float32)
    dy_out = np.empty(shape, np.float32)
    gap_out = np.empty(shape, np.float32)

    xs = np.arange(size, dtype=np.float32) + 0.5
    cx = np.minimum((xs // cell).astype(np.int64), g - 1) + 1
    for y0 in range(0, size, chunk):
        ys = np.arange(y0, min(y0 + chunk, size), dtype=np.float32) + 0.5
        cy = np.minimum((ys // cell).astype(np.int64), g - 1) + 1
        rows = slice(y0, y0 + len(ys))
        # Running nearest and second-nearest (squared distance, padded-lattice index).
        b1 = np.full((len(ys), size), np.inf, np.float32)
        b2 = np.full((len(ys), size), np.inf, np.float32)
        k1 = np.zeros((len(ys), size), np.int32)
        k2 = np.zeros((len(ys), size), np.int32)
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                k = ((cy[:, None] + oy) * (g + 2) + (cx[None, :] + ox)).astype(np.int32)
                d2 = (xs[None, :] - psx.ravel()[k]) ** 2 + (ys[:, None] - psy.ravel()[k]) ** 2
                lt1 = d2 < b1
                lt2 = d2 < b2
                # Second best becomes the old best where d beats it, else d where d
                # beats the old second best: b2 = min(b2, max(b1, d)).
                np.copyto(k2, np.where(lt1, k1, k), where=lt2)
                np.minimum(b2, np.maximum(b1, d2), out=b2)
                np.minimum(b1, d2, out=b1)
                np.copyto(k1, k, where=lt1)
        dx1 = xs[None, :] - psx.ravel()[k1]
        dy1 = ys[:, None] - psy.ravel()[k1]
        dx2 = xs[None, :] - psx.ravel()[k2]
        dy2 = ys[:, None] - psy.ravel()[k2]
        f1_out[rows] = np.sqrt(b1)
        f2_out[rows] = np.sqrt(b2)
        id1_out[rows] = pid.ravel()[k1]
        id2_out[rows] = pid.ravel()[k2]
        dx_out[rows], dy_out[rows] = dx1, dy1
        # Distance to the bisector of the two seeds: (f2^2 - f1^2) / (2 |s2 - s1|).
        sep = np.hypot(dx1 - dx2, dy1 - dy2)
        gap_out[rows] = (b2 - b1) / (2.0 * np.maximum(sep, 1e-3))
    return Worley(seeds, dx_out, dy_out, f1_out, f2_out, id1_out, id2_out, gap_out)


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    sd = float(a.std())
    return a / sd if sd > 0 else a
