"""Ruifrok-Johnston colour deconvolution of H&E into hematoxylin, eosin and residual.

Light absorbed by a stain layer follows Beer-Lambert, so optical density
``OD = -log10(I / I0)`` is linear in stain amounts; projecting the per-channel OD onto
the inverse of the stain-vector matrix separates the stains. The matrix is
scikit-image's ``hed_from_rgb`` (Ruifrok & Johnston 2001), so our stain densities are
exactly ``6 x skimage.color.rgb2hed`` (which scales OD by ``1 / log(1e-6)``):
we keep plain decadic OD units, where a nucleus has H of about 0.5-1.
"""

from __future__ import annotations

import functools

import numpy as np
from skimage.color import hed_from_rgb

HED_FROM_RGB = hed_from_rgb.astype(np.float32)
# Summed RGB optical density above which a pixel is tissue: white background is
# about 0.05, pale stroma about 0.2-0.3, nuclei above 1.
TISSUE_OD_SUM = 0.2


@functools.lru_cache(maxsize=8)
def od_lut(n: int) -> np.ndarray:
    """OD of every possible sum of ``n`` uint8 intensities, with ``I0 = 255``.

    Intensities below 1 are clipped to 1 so black pixels get a finite OD (2.41).
    """
    sums = np.arange(255 * n + 1, dtype=np.float64)
    mean = np.maximum(sums / n, 1.0)
    lut = (-np.log10(mean / 255.0)).astype(np.float32)
    # Shared through the cache: a caller must not be able to corrupt it.
    lut.setflags(write=False)
    return lut


def optical_density(sums: np.ndarray, n: int = 1) -> np.ndarray:
    """OD of block sums (``n`` pixels each) or of plain uint8 pixels (``n=1``); same shape."""
    return od_lut(n)[sums]


def stain_density(od: np.ndarray) -> np.ndarray:
    """Hematoxylin, eosin and residual densities from channel-planar RGB OD ``(B, 3, ...)``.

    Negative densities (stain absent) are clipped at 0, as scikit-image does.
    """
    b = od.shape[0]
    flat = np.matmul(HED_FROM_RGB.T, od.reshape(b, 3, -1))
    np.maximum(flat, 0, out=flat)
    return flat.reshape(od.shape)


def tissue_mask(od: np.ndarray, threshold: float = TISSUE_OD_SUM) -> np.ndarray:
    """Tissue pixels ``(B, ...)`` of channel-planar OD ``(B, 3, ...)``: summed OD above ``threshold``."""
    return (od[:, 0] + od[:, 1] + od[:, 2]) > threshold
