"""Where each tissue class lies on a slide: smooth class fields and the label map.

The layout is a stack of five scalar fields on a coarse grid (one sample per 32 level-0
pixels): tissue, tumour bed, necrosis, lymphocytes and fat. A point's class follows from
the signs of the fields at that point (:func:`classify`), so the class is defined at any
level-0 location by bilinear interpolation of the fields. The label map (one class per
16 px) and the renderer (one class per 4 px) call the same rule at different sampling
densities, which keeps them consistent, and boundaries look smooth at 20x although the
fields are small.

Patient morphology is planted here: tumour nodules are placed inside tissue and scaled
so the tumour bed covers the patient's tumour fraction of the tissue; necrosis fills the
cores of the largest nodules up to the necrosis fraction; lymphocytes gather at the
tumour margin in proportion to the infiltration; fat takes a share of the remaining
tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .classes import BACKGROUND, FAT, LABEL_DS, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR
from .model import Morphology
from .noise import fractal_noise, value_noise

FIELD_DS = 32  # level-0 pixels per field sample
_N_FIELDS = 5
_TISSUE, _TUMOUR, _NECROSIS, _LYMPH, _FAT = range(_N_FIELDS)


@dataclass(frozen=True)
class Nodule:
    """A planted tumour nodule: centre and nominal radius in level-0 pixels.

    The nodule's boundary is irregular (noise-perturbed), so the radius is that of the
    underlying disc, not an exact extent.
    """

    x: float
    y: float
    radius: float

    def as_dict(self) -> dict[str, float]:
        return {"x": round(self.x, 1), "y": round(self.y, 1), "radius": round(self.radius, 1)}


@dataclass(frozen=True)
class SlideLayout:
    """Class fields of one slide plus the nodules planted in it."""

    width: int
    height: int
    fields: np.ndarray  # (5, ceil(H/32), ceil(W/32)) float32; a class holds where its field > 0
    nodules: tuple[Nodule, ...]

    def classes_at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Class index (uint8) on the grid of level-0 positions ``ys`` x ``xs``."""
        return classify(interpolate_fields(self.fields, ys, xs))

    def label_map(self, chunk_rows: int = 256) -> np.ndarray:
        """One class per 16x16 level-0 pixels, sampled at each block's centre."""
        hl, wl = self.height // LABEL_DS, self.width // LABEL_DS
        xs = np.arange(wl) * LABEL_DS + LABEL_DS / 2
        out = np.empty((hl, wl), np.uint8)
        for r0 in range(0, hl, chunk_rows):
            ys = np.arange(r0, min(r0 + chunk_rows, hl)) * LABEL_DS + LABEL_DS / 2
            out[r0 : r0 + len(ys)] = self.classes_at(ys, xs)
        return out


def classify(f: np.ndarray) -> np.ndarray:
    """Class per point from the stacked field values ``f`` of shape (5, ...).

    Precedence: outside tissue is background; in the tumour bed, necrosis where its
    field is positive, else tumour; outside the bed, lymphocytes, then fat, else stroma.
    """
    out = np.full(f.shape[1:], STROMA, np.uint8)
    tissue = f[_TISSUE] > 0
    bed = tissue & (f[_TUMOUR] > 0)
    out[tissue & ~bed & (f[_FAT] > 0)] = FAT
    out[tissue & ~bed & (f[_LYMPH] > 0)] = LYMPHOCYTES
    out[bed] = TUMOUR
    out[bed & (f[_NECROSIS] > 0)] = NECROSIS
    out[~tissue] = BACKGROUND
    return out


def interpolate_fields(fields: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of the field stack at level-0 grid positions ``ys`` x ``xs``.

    Field sample (i, j) sits at level-0 (32 j + 16, 32 i + 16); positions beyond the
    outermost samples take the edge value. Separable, so the cost is linear in the
    number of output points.
    """
    i0, i1, wy = _axis_weights(np.asarray(ys, np.float64), fields.shape[1])
    j0, j1, wx = _axis_weights(np.asarray(xs, np.float64), fields.shape[2])
    rows = fields[:, i0, :] * (1 - wy)[None, :, None] + fields[:, i1, :] * wy[None, :, None]
    return rows[:, :, j0] * (1 - wx)[None, None, :] + rows[:, :, j1] * wx[None, None, :]


def _axis_weights(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = np.clip((pos - FIELD_DS / 2) / FIELD_DS, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w = (u - i0).astype(np.float32)
    return i0, i1, w


def make_layout(width: int, height: int, morph: Morphology, rng: np.random.Generator) -> SlideLayout:
    """Plant the patient's morphology into a fresh tissue layout of the given size."""
    hf, wf = -(-height // FIELD_DS), -(-width // FIELD_DS)
    shape = (hf, wf)
    fields = np.full((_N_FIELDS, hf, wf), -1.0, np.float32)

    tissue = _tissue_field(shape, rng)
    fields[_TISSUE] = tissue
    in_tissue = tissue > 0

    tumour, nodules_f = _tumour_field(shape, in_tissue, morph, rng)
    fields[_TUMOUR] = tumour
    bed = in_tissue & (tumour > 0)

    if morph.necrosis_fraction > 0 and bed.any():
        fields[_NECROSIS] = _necrosis_field(shape, bed, nodules_f, morph.necrosis_fraction, rng)

    stroma_zone = in_tissue & ~bed
    dist_to_bed = ndimage.distance_transform_edt(~bed) if bed.any() else np.full(shape, 1e6, np.float32)
    if stroma_zone.any():
        # Peritumoral lymphocytic infiltrate: score decays away from the tumour margin,
        # plus lymphoid aggregates anywhere in the stroma.
        lymph_score = 2.0 * np.exp(-dist_to_bed / 8.0) + 0.8 * fractal_noise(shape, 24.0, rng, octaves=2)
        lymph_target = 0.03 + 0.32 * morph.lymphocyte_infiltration
        fields[_LYMPH] = _threshold_to_fraction(lymph_score, stroma_zone, lymph_target)
        remaining = stroma_zone & (fields[_LYMPH] <= 0)
        if morph.fat_fraction > 0 and remaining.any():
            fat_score = fractal_noise(shape, 32.0, rng, octaves=2) - 1.2 * np.exp(-dist_to_bed / 10.0)
            want = min(1.0, morph.fat_fraction * stroma_zone.sum() / remaining.sum())
            fields[_FAT] = _threshold_to_fraction(fat_score, remaining, want)

    nodules = tuple(
        Nodule(x=(j + 0.5) * FIELD_DS, y=(i + 0.5) * FIELD_DS, radius=r * FIELD_DS) for i, j, r in nodules_f
    )
    return SlideLayout(width=width, height=height, fields=fields, nodules=nodules)


def _tissue_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Irregular tissue islands: thresholded fractal noise pulled towards the centre."""
    hf, wf = shape
    noise = fractal_noise(shape, min(hf, wf) / 2.5, rng, octaves=4, persistence=0.55)
    yy = (np.arange(hf)[:, None] + 0.5) / hf - 0.5
    xx = (np.arange(wf)[None, :] + 0.5) / wf - 0.5
    score = noise - 3.0 * ((xx / 0.5) ** 2 + (yy / 0.5) ** 2)
    # Keep glass around the section, as on a real slide. The penalty ramps up smoothly
    # over the outer 12 % so tissue curves away from the edge instead of being cut
    # along a straight line.
    edge = np.minimum(np.minimum(yy + 0.5, 0.5 - yy), np.minimum(xx + 0.5, 0.5 - xx))
    ramp = np.clip(1.0 - edge / 0.12, 0.0, 1.0)
    score = score - 12.0 * ramp**2
    coverage = rng.uniform(0.35, 0.55)
    thr = np.quantile(score, 1.0 - coverage)
    return (score - thr).astype(np.float32)


def _tumour_field(
    shape: tuple[int, int], in_tissue: np.ndarray, morph: Morphology, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Tumour-bed field from noisy discs scaled to cover the tumour fraction of tissue.

    Returns the field and the nodules as (row, col, radius) in field units.
    """
    tissue_area = float(in_tissue.sum())
    if tissue_area == 0 or morph.tumour_fraction <= 0:
        return np.full(shape, -1.0, np.float32), []
    depth = ndimage.distance_transform_edt(in_tissue)
    cand = np.flatnonzero(in_tissue)
    # Centres prefer deep tissue so nodules are not mostly cut off by the tissue edge.
    p = depth.ravel()[cand] ** 2
    p = p / p.sum()
    k = len(morph.nodule_weights)
    centres = rng.choice(cand, size=k, replace=len(cand) < k, p=p)
    ci, cj = np.unravel_index(centres, shape)
    target = morph.tumour_fraction * tissue_area
    base_r = np.sqrt(np.asarray(morph.nodule_weights) * target / np.pi)

    yy = np.arange(shape[0], dtype=np.float32)[:, None] + 0.0
    xx = np.arange(shape[1], dtype=np.float32)[None, :] + 0.0
    dists = [np.hypot(yy - i, xx - j) for i, j in zip(ci, cj, strict=True)]
    # Irregular outline: noise in units of the nodule radius.
    wobble = 0.28 * fractal_noise(shape, max(3.0, float(np.median(base_r)) / 2.0), rng, octaves=2)

    def field(scale: float) -> np.ndarray:
        best = np.full(shape, -np.inf, np.float32)
        for d, r in zip(dists, base_r, strict=True):
            np.maximum(best, 1.0 - d / (scale * r + 1e-6), out=best)
        return best + wobble

    # Overlap and clipping by the tissue edge shrink the bed; find the common scale
    # that restores the target area (bisection: area grows monotonically with scale).
    lo, hi = 0.3, 4.0
    for _ in range(22):
        mid = 0.5 * (lo + hi)
        area = float(((field(mid) > 0) & in_tissue).sum())
        lo, hi = (mid, hi) if area < target else (lo, mid)
    scale = 0.5 * (lo + hi)
    nodules = [(float(i), float(j), float(scale * r)) for i, j, r in zip(ci, cj, base_r, strict=True)]
    return field(scale).astype(np.float32), nodules


def _necrosis_field(
    shape: tuple[int, int],
    bed: np.ndarray,
    nodules: list[tuple[float, float, float]],
    fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Geographic necrosis in the cores of nodules, larger nodules first."""
    yy = np.arange(shape[0], dtype=np.float32)[:, None]
    xx = np.arange(shape[1], dtype=np.float32)[None, :]
    r_max = max(r for _, _, r in nodules)
    core = np.full(shape, -np.inf, np.float32)
    for i, j, r in nodules:
        # Big nodules outgrow their blood supply: weight the core by relative size.
        np.maximum(core, (1.0 - np.hypot(yy - i, xx - j) / r) * (r / r_max) ** 0.7, out=core)
    score = core + 0.3 * value_noise(shape, max(2.0, r_max / 4.0), rng)
    return _threshold_to_fraction(score, bed, fraction)


def _threshold_to_fraction(score: np.ndarray, domain: np.ndarray, fraction: float) -> np.ndarray:
    """Shift ``score`` so that it is positive on ``fraction`` of ``domain`` and -1 outside."""
    out = np.full(score.shape, -1.0, np.float32)
    if fraction <= 0 or not domain.any():
        return out
    vals = score[domain]
    thr = np.quantile(vals, 1.0 - min(fraction, 1.0))
    shifted = (score - thr).astype(np.float32)
    if fraction >= 1.0:
        shifted += 1e-3
    out[domain] = shifted[domain]
    # Outside the domain the field keeps its (smooth) value where that is negative, so
    # interpolation near the domain edge does not invent spurious positives.
    outside = ~domain
    out[outside] = np.minimum(shifted[outside], -1e-3)
    return out
