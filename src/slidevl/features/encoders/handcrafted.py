"""``handcrafted``: the embedded default encoder, needing no weights and no download.

Each tile is box-downsampled to 64 px (2 µm/px for 256 px at 0.5 µm/px), then
described by 86 named features in five groups:

* ``stain``: Ruifrok-Johnston hematoxylin / eosin / residual densities over tissue
  pixels (mean, std, 10/25/50/75/90th percentiles), tissue fraction, mean OD, the
  H share of H + E and the pixelwise H-E correlation;
* ``nuclei``: hematoxylin-positive and strongly positive area, count, density, peak
  density and size proxy of hematoxylin blobs (see :mod:`.nuclei`);
* ``glcm``: co-occurrence contrast, dissimilarity, homogeneity, energy, correlation and
  entropy of the grey image (16 levels of 0-255) and of the hematoxylin map (16 levels
  of 0-1.2 OD), averaged over 0/45/90/135 degrees at distances 1 and 3 px, plus the
  spread of contrast across angles (fibres and streaks are anisotropic);
* ``lbp``: rotation-invariant uniform LBP histograms (8 neighbours, radius 1) of the
  grey image at 64 px and at 32 px;
* ``colour``: RGB means and stds, the mean saturation-weighted hue vector, and HSV
  saturation and value means and stds.

All of it runs in :meth:`worker_transform`, in the DataLoader workers; ``encode`` only
checks the result. Nothing loops over tiles.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidevl.config import Config
from slidevl.features.encoders.base import EncoderError, TileEncoder, check_features, check_tiles
from slidevl.features.encoders.downsample import block_sum
from slidevl.features.encoders.masked import masked_corr, masked_moments, masked_percentiles
from slidevl.features.encoders.nuclei import nuclei_features
from slidevl.features.encoders.stain import TISSUE_OD_SUM, optical_density, stain_density, tissue_mask
from slidevl.features.encoders.texture import (
    GLCM_PROPERTIES,
    code_histogram,
    glcm_counts,
    glcm_offsets,
    glcm_properties,
    uniform_lbp,
)

# Bump when the meaning of any feature changes: it is part of the revision.
ALGORITHM_VERSION = "1"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


@dataclass(frozen=True)
class HandcraftedConfig(Config):
    """Parameters of the hand-made features; all of them enter the revision hash."""

    analysis_size: int = 64
    glcm_levels: int = 16
    glcm_distances: tuple[int, ...] = (1, 3)
    hema_glcm_max: float = 1.2
    lbp_points: int = 8
    lbp_radius: float = 1.0
    percentiles: tuple[int, ...] = (10, 25, 50, 75, 90)
    tissue_od_sum: float = TISSUE_OD_SUM

    def __post_init__(self) -> None:
        problems = []
        if self.analysis_size < 8 or self.analysis_size % 2:
            problems.append(f"analysis_size must be an even number >= 8, got {self.analysis_size}")
        if not 2 <= self.glcm_levels <= 256:
            problems.append(f"glcm_levels must be in 2..256, got {self.glcm_levels}")
        if self.hema_glcm_max <= 0:
            problems.append(f"hema_glcm_max must be > 0, got {self.hema_glcm_max}")
        if self.lbp_radius <= 0 or 2 * math.ceil(self.lbp_radius) >= self.analysis_size // 2:
            problems.append(f"lbp_radius must be > 0 and small against analysis_size / 2, got {self.lbp_radius}")
        if any(not 0 <= q <= 100 for q in self.percentiles):
            problems.append(f"percentiles must lie in 0..100, got {self.percentiles}")
        if problems:
            raise EncoderError("handcrafted: " + "; ".join(problems))


class HandcraftedEncoder(TileEncoder):
    """Stain, nuclear, texture and colour statistics of H&E tiles (see module docstring)."""

    def __init__(self, config: HandcraftedConfig | None = None) -> None:
        self.config = config or HandcraftedConfig()
        self.name = "handcrafted"
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        self.revision = f"v{ALGORITHM_VERSION}-{digest}"
        self.input_size = 256
        probe = self._features(np.full((1, self.config.analysis_size, self.config.analysis_size, 3), 200, np.uint8))
        self.feature_names: list[str] = list(probe)
        self.feature_dim = len(self.feature_names)

    def worker_transform(self, tiles: np.ndarray) -> np.ndarray:
        tiles = check_tiles(tiles)
        if len(tiles) == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        feats = self._features(tiles)
        return np.stack(list(feats.values()), axis=1).astype(np.float32)

    def encode(self, transformed: Any) -> np.ndarray:
        return check_features(transformed, self.feature_dim, self.name)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "source": "slidevl.features.encoders.handcrafted",
            "config": self.config.to_dict(),
            "feature_names": self.feature_names,
        }

    def _features(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        cfg = self.config
        size = cfg.analysis_size
        b = tiles.shape[0]
        sums, n = block_sum(tiles, size)  # (B, 3, S, S)
        od = optical_density(sums, n)
        hed = stain_density(od)
        tissue = tissue_mask(od, cfg.tissue_od_sum)
        rgb = sums.astype(np.float32)
        rgb *= np.float32(1.0 / (255 * n))
        grey = _LUMA[0] * rgb[:, 0] + _LUMA[1] * rgb[:, 1] + _LUMA[2] * rgb[:, 2]

        feats: dict[str, np.ndarray] = {}
        feats.update(_stain_features(od.reshape(b, 3, -1), hed.reshape(b, 3, -1), tissue.reshape(b, -1), cfg.percentiles))
        feats.update(nuclei_features(hed[:, 0], tissue))

        top = cfg.glcm_levels - 1
        grey_levels = np.minimum(grey * cfg.glcm_levels, top).astype(np.uint8)
        hema_levels = np.minimum(hed[:, 0] * (cfg.glcm_levels / cfg.hema_glcm_max), top).astype(np.uint8)
        offsets = glcm_offsets(cfg.glcm_distances, _ANGLES)
        for label, levels_img in (("grey", grey_levels), ("hema", hema_levels)):
            props = glcm_properties(glcm_counts(levels_img, cfg.glcm_levels, offsets))
            feats.update(_glcm_summary(label, props, cfg.glcm_distances, len(_ANGLES)))

        # LBP on integer grey levels, as scikit-image recommends: float noise would
        # otherwise decide ties between equal neighbours.
        half = grey.reshape(b, size // 2, 2, size // 2, 2).mean(axis=(2, 4))
        n_codes = cfg.lbp_points + 2
        for label, img in ((f"{size}px", grey), (f"{size // 2}px", half)):
            codes = uniform_lbp(np.rint(img * 255).astype(np.uint8), cfg.lbp_points, cfg.lbp_radius)
            hist = code_histogram(codes, n_codes)
            for code in range(n_codes):
                feats[f"lbp_{label}_{code}"] = hist[:, code]

        feats.update(_colour_features(rgb.reshape(b, 3, -1)))
        return feats


def _stain_features(od: np.ndarray, hed: np.ndarray, tissue: np.ndarray, qs: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Stain statistics over tissue pixels of planar ``od``/``hed (B, 3, N)``, ``tissue (B, N)``."""
    feats: dict[str, np.ndarray] = {"tissue_fraction": tissue.mean(axis=1)}
    od_sum = (od[:, 0] + od[:, 1] + od[:, 2])[:, None]
    feats["od_mean"] = masked_moments(od_sum, tissue)[0][:, 0]
    mean, std = masked_moments(hed, tissue)
    pct = masked_percentiles(hed[:, :2], tissue, qs)
    for k, stain in enumerate(("h", "e")):
        feats[f"{stain}_mean"] = mean[:, k]
        feats[f"{stain}_std"] = std[:, k]
        for j, q in enumerate(qs):
            feats[f"{stain}_p{q}"] = pct[:, k, j]
    feats["residual_mean"], feats["residual_std"] = mean[:, 2], std[:, 2]
    total = mean[:, 0] + mean[:, 1]
    feats["h_share"] = np.where(total > 0, mean[:, 0] / np.where(total > 0, total, 1), 0.0)
    feats["he_corr"] = masked_corr(hed[:, 0], hed[:, 1], tissue, (mean[:, 0], std[:, 0]), (mean[:, 1], std[:, 1]))
    return feats


def _glcm_summary(label: str, props: dict[str, np.ndarray], distances: tuple[int, ...], n_angles: int) -> dict[str, np.ndarray]:
    """Angle-averaged properties per distance, and the spread of contrast across angles."""
    feats: dict[str, np.ndarray] = {}
    b = next(iter(props.values())).shape[0]
    for name in GLCM_PROPERTIES:
        per = props[name].reshape(b, len(distances), n_angles)
        for i, d in enumerate(distances):
            feats[f"glcm_{label}_{name}_d{d}"] = per[:, i].mean(axis=1)
    contrast = props["contrast"].reshape(b, len(distances), n_angles)
    for i, d in enumerate(distances):
        c = contrast[:, i]
        feats[f"glcm_{label}_contrast_anisotropy_d{d}"] = (c.max(axis=1) - c.min(axis=1)) / (c.mean(axis=1) + 1e-6)
    return feats


def _colour_features(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """RGB and HSV-style summaries of planar ``rgb (B, 3, N)`` in [0, 1]."""
    feats: dict[str, np.ndarray] = {}
    mean = rgb.mean(axis=2)
    std = rgb.std(axis=2)
    for k, ch in enumerate("rgb"):
        feats[f"{ch}_mean"] = mean[:, k]
        feats[f"{ch}_std"] = std[:, k]
    r, g, bl = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    value = np.maximum(np.maximum(r, g), bl)
    chroma = value - np.minimum(np.minimum(r, g), bl)
    inv_value = 1.0 / np.maximum(value, 1e-3)
    sat = chroma * inv_value
    # The opponent-colour vector (alpha, beta) points along the pixel's hue with length
    # equal to its chroma (hexagonal hue model); dividing by value weights hue by
    # saturation, so grey pixels, whose hue is undefined, contribute nothing.
    alpha = r - 0.5 * (g + bl)
    beta = np.float32(np.sqrt(3) / 2) * (g - bl)
    feats["hue_x"] = np.einsum("bn,bn->b", alpha, inv_value) / rgb.shape[2]
    feats["hue_y"] = np.einsum("bn,bn->b", beta, inv_value) / rgb.shape[2]
    feats["saturation_mean"] = sat.mean(axis=1)
    feats["saturation_std"] = sat.std(axis=1)
    feats["value_mean"] = value.mean(axis=1)
    feats["value_std"] = value.std(axis=1)
    return feats
