"""H&E colour model: stain densities -> RGB through a per-slide lookup table.

Texture banks store two 8-bit stain concentrations per pixel, hematoxylin (nuclei,
blue-purple) and eosin (cytoplasm and collagen, pink). Light through the section
follows Beer-Lambert, ``I = I0 * exp(-(h * OD_h + e * OD_e))``, with the stain
optical-density vectors of Ruifrok & Johnston. Evaluating the exponential per pixel
would dominate the render time, so every (h, e) pair is precomputed into a 65,536-entry
table of 3-byte RGB records; rendering a pixel is then one ``np.take`` that already
yields a contiguous RGB image.

Each slide gets its own table with jittered stain vectors, stain strengths and glass
brightness, which mimics the staining variation between laboratories and days.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Optical density per unit concentration (R, G, B). Hematoxylin absorbs red and green
# (so nuclei look blue-purple); eosin absorbs mostly green (pink). Eosin's red and blue
# absorption is slightly higher than Ruifrok's pure eosin, as seen in real H&E.
HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.12, 0.95, 0.42])


@dataclass(frozen=True)
class Stain:
    """Stain parameters of one slide."""

    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    h_strength: float  # optical density of a fully saturated (255) hematoxylin pixel
    e_strength: float
    glass: tuple[float, float, float]  # RGB brightness of empty glass, 0-255

    def as_dict(self) -> dict[str, object]:
        return {
            "h_od": list(self.h_od),
            "e_od": list(self.e_od),
            "h_strength": self.h_strength,
            "e_strength": self.e_strength,
            "glass": list(self.glass),
        }


def default_stain() -> Stain:
    """The reference stain, without jitter."""
    return Stain(
        h_od=tuple(float(v) for v in _unit(HEMATOXYLIN_OD)),
        e_od=tuple(float(v) for v in _unit(EOSIN_OD)),
        h_strength=1.9,
        e_strength=1.05,
        glass=(243.0, 241.0, 244.0),
    )


def sample_stain(rng: np.random.Generator, strength: float = 1.0) -> Stain:
    """A slide's stain: the reference perturbed by realistic lab-to-lab variation.

    ``strength`` scales all perturbations (0 gives :func:`default_stain`).
    """
    ref = default_stain()
    h = _unit(np.asarray(ref.h_od) + strength * rng.normal(0, 0.04, 3))
    e = _unit(np.asarray(ref.e_od) + strength * rng.normal(0, 0.04, 3))
    glass_level = 243.0 + strength * rng.normal(0, 3.0)
    glass = np.clip(glass_level + strength * rng.normal(0, 1.5, 3), 225, 252)
    return Stain(
        h_od=tuple(float(v) for v in np.abs(h)),
        e_od=tuple(float(v) for v in np.abs(e)),
        h_strength=float(ref.h_strength * np.exp(strength * rng.normal(0, 0.10))),
        e_strength=float(ref.e_strength * np.exp(strength * rng.normal(0, 0.12))),
        glass=tuple(float(v) for v in glass),
    )


def stain_lut(stain: Stain) -> np.ndarray:
    """RGB table indexed by ``(h << 8) | e`` for 8-bit stain densities.

    Returns a (65536,) array of 3-byte void records (R, G, B), the element type that
    lets :func:`apply_lut` gather whole pixels at once.
    """
    conc = np.arange(256, dtype=np.float64) / 255.0
    od = (
        conc[:, None, None] * stain.h_strength * np.asarray(stain.h_od)[None, None, :]
        + conc[None, :, None] * stain.e_strength * np.asarray(stain.e_od)[None, None, :]
    )
    rgb = np.asarray(stain.glass)[None, None, :] * np.exp(-od)
    table = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3))
    return table.view("V3").reshape(-1)


def apply_lut(h: np.ndarray, e: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` image (..., 3) for stain density planes ``h`` and ``e`` (uint8)."""
    idx = (h.astype(np.uint16) << 8) | e
    return np.take(lut, idx).view(np.uint8).reshape(*h.shape, 3)


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / float(np.linalg.norm(v))
