"""Where each tissue class lies on a slide: smooth class fields and the label map.

The layout is a stack of five scalar fields on a coarse grid (one sample per 32 level-0
pixels): tissue, tumour bed, necrosis, lymphocytes and fat. A point's class follows from
the signs of the fields at that point (:func:`classify`), so the class is defined at any
level-0 location by bilinear interpolation of the fields. The label map (one class per
16 px) and the renderer (one class per 4 px) call the same rule at different sampling
densities, which keeps them consistent, and boundaries look smooth at 20x although the
fields are small.

Patient morphology is planted here: tumour nodules are placed inside tissue and scaled
so the tumour bed covers the patient's tumour fraction of the tissue; necrosis fills
part of the largest nodules up to the necrosis fraction; lymphocytes gather at the
tumour margin in proportion to the infiltration; fat takes a share of the remaining
tissue.

How the slide is arranged is drawn per slide (:class:`Arrangement`), independently of
the patient, so spatial questions have varied answers while the class proportions (and
so the survival signal) keep their distribution: the tissue comes in one to four
fragments with glass between them; nodules keep apart where the tissue leaves room;
either one nodule sits on the tissue edge, so tumour reaches the glass, or the tumour
bed keeps :data:`EDGE_MARGIN` inside the tissue; and necrosis lies either in the cores
of the nodules or against their margins. What the slide finally shows (nodules that
still merged, a fragment that broke in two) is measured from the label map by
:mod:`slidevl.synth.spatial`.
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
MAX_FRAGMENTS = 4
#: Field samples of tissue kept between a confined tumour bed and the glass (4 x 32 px
#: at 0.5 µm/px is 64 µm, above the 40 µm that makes "away from the edge" unambiguous).
EDGE_MARGIN = 4.0
# Nodule centres are placed at least this many times the sum of their radii apart when
# the tissue leaves room (best of _PLACEMENT_TRIES candidates otherwise).
_NODULE_CLEARANCE = 1.15
_PLACEMENT_TRIES = 64
# Tumour-bed pieces smaller than this many field samples (0.02 mm² at 0.5 µm/px) are removed.
_MIN_BED_SAMPLES = 80


@dataclass(frozen=True)
class Arrangement:
    """How one slide is laid out, drawn per slide (see the module docstring)."""

    n_fragments: int  # tissue pieces planned (noise can still split or drop one)
    tumour_at_edge: bool  # one nodule centred on the tissue edge; else the bed keeps EDGE_MARGIN inside
    necrosis_at_margin: bool  # necrosis against the nodules' margins; else in their cores

    def as_dict(self) -> dict[str, object]:
        return {"n_fragments": self.n_fragments, "tumour_at_edge": self.tumour_at_edge,
                "necrosis_at_margin": self.necrosis_at_margin}


def sample_arrangement(rng: np.random.Generator) -> Arrangement:
    """Uniform over 1..MAX_FRAGMENTS fragments, a fair coin for the edge, 70 % marginal necrosis.

    Marginal necrosis is favoured because some of it stays ambiguous (too much of its
    border is tumour), while core necrosis is almost always clearly inside.
    """
    return Arrangement(
        n_fragments=int(rng.integers(1, MAX_FRAGMENTS + 1)),
        tumour_at_edge=bool(rng.random() < 0.5),
        necrosis_at_margin=bool(rng.random() < 0.7),
    )


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
    arrangement: Arrangement

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


def make_layout(width: int, height: int, morph: Morphology, rng: np.random.Generator,
                arrangement: Arrangement | None = None) -> SlideLayout:
    """Plant the patient's morphology into a fresh tissue layout of the given size.

    The arrangement is drawn from ``rng`` unless given.
    """
    arrangement = arrangement or sample_arrangement(rng)
    hf, wf = -(-height // FIELD_DS), -(-width // FIELD_DS)
    shape = (hf, wf)
    fields = np.full((_N_FIELDS, hf, wf), -1.0, np.float32)

    tissue = _tissue_field(shape, arrangement.n_fragments, rng)
    fields[_TISSUE] = tissue
    in_tissue = tissue > 0

    tumour, nodules_f = _tumour_field(shape, in_tissue, morph, arrangement.tumour_at_edge, rng)
    fields[_TUMOUR] = tumour
    bed = in_tissue & (tumour > 0)

    if morph.necrosis_fraction > 0 and bed.any():
        fields[_NECROSIS] = _necrosis_field(shape, bed, nodules_f, morph.necrosis_fraction,
                                            arrangement.necrosis_at_margin, rng)

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
    return SlideLayout(width=width, height=height, fields=fields, nodules=nodules, arrangement=arrangement)


def _tissue_field(shape: tuple[int, int], n_fragments: int, rng: np.random.Generator) -> np.ndarray:
    """Irregular tissue islands: thresholded fractal noise pulled towards the fragment centres."""
    hf, wf = shape
    noise = fractal_noise(shape, min(hf, wf) / (2.5 * np.sqrt(n_fragments)), rng, octaves=4, persistence=0.55)
    yy = (np.arange(hf)[:, None] + 0.5) / hf - 0.5
    xx = (np.arange(wf)[None, :] + 0.5) / wf - 0.5
    # Each fragment is pulled towards its own centre over a reach that shrinks with the
    # number of fragments, so together they keep the coverage of one; with one fragment
    # the pull is 3 (2r)^2 from the slide's centre.
    reach = 0.5 / np.sqrt(n_fragments)
    dist = np.sort(np.stack([np.hypot(xx - cx, yy - cy) for cx, cy in _fragment_centres(n_fragments, rng)]), axis=0)
    score = noise - 3.0 * (dist[0] / reach) ** 2
    if n_fragments > 1:
        # Glass between fragments: a point about as close to a second centre as to its
        # own lies on the boundary of two fragments.
        score = score - 12.0 * np.clip(1.0 - (dist[1] - dist[0]) / (0.25 * reach), 0.0, 1.0) ** 2
    # Keep glass around the section, as on a real slide. The penalty ramps up smoothly
    # over the outer 12 % so tissue curves away from the edge instead of being cut
    # along a straight line.
    edge = np.minimum(np.minimum(yy + 0.5, 0.5 - yy), np.minimum(xx + 0.5, 0.5 - xx))
    ramp = np.clip(1.0 - edge / 0.12, 0.0, 1.0)
    score = score - 12.0 * ramp**2
    coverage = rng.uniform(0.35, 0.55)
    thr = np.quantile(score, 1.0 - coverage)
    return (score - thr).astype(np.float32)


def _fragment_centres(n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Fragment centres (relative to the slide centre): the corners of a jittered, turned regular polygon."""
    if n == 1:
        return [(0.0, 0.0)]
    turn = rng.uniform(0.0, 2.0 * np.pi)
    radius = 0.2 + 0.02 * n
    return [(radius * np.cos(turn + 2 * np.pi * k / n) + rng.uniform(-0.03, 0.03),
             radius * np.sin(turn + 2 * np.pi * k / n) + rng.uniform(-0.03, 0.03)) for k in range(n)]


def _tumour_field(
    shape: tuple[int, int], in_tissue: np.ndarray, morph: Morphology, at_edge: bool, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Tumour-bed field from noisy discs scaled to cover the tumour fraction of tissue.

    With ``at_edge`` one nodule is centred on the tissue edge; otherwise the bed is kept
    :data:`EDGE_MARGIN` inside the tissue, unless the tissue is too thin to hold the
    tumour fraction that way (then it may reach the edge). Returns the field and the
    nodules as (row, col, radius) in field units.
    """
    tissue_area = float(in_tissue.sum())
    if tissue_area == 0 or morph.tumour_fraction <= 0:
        return np.full(shape, -1.0, np.float32), []
    depth = ndimage.distance_transform_edt(in_tissue)
    target = morph.tumour_fraction * tissue_area
    base_r = np.sqrt(np.asarray(morph.nodule_weights) * target / np.pi)
    ci, cj = _nodule_centres(depth, base_r, at_edge, rng)

    yy = np.arange(shape[0], dtype=np.float32)[:, None] + 0.0
    xx = np.arange(shape[1], dtype=np.float32)[None, :] + 0.0
    dists = [np.hypot(yy - i, xx - j) for i, j in zip(ci, cj, strict=True)]
    # Irregular outline: noise in units of the nodule radius.
    wobble = 0.28 * fractal_noise(shape, max(3.0, float(np.median(base_r)) / 2.0), rng, octaves=2)
    # A confined bed fades out before the margin, so its outline stays smooth there.
    limit = None if at_edge else ((depth - EDGE_MARGIN) / EDGE_MARGIN).astype(np.float32)

    def field(scale: float, limit: np.ndarray | None) -> np.ndarray:
        best = np.full(shape, -np.inf, np.float32)
        for d, r in zip(dists, base_r, strict=True):
            np.maximum(best, 1.0 - d / (scale * r + 1e-6), out=best)
        best += wobble
        return best if limit is None else np.minimum(best, limit)

    def fit(limit: np.ndarray | None) -> tuple[float, float]:
        # Overlap and clipping by the tissue edge shrink the bed; find the common scale
        # that restores the target area (bisection: area grows monotonically with scale).
        lo, hi = 0.3, 4.0
        for _ in range(22):
            mid = 0.5 * (lo + hi)
            area = float(((field(mid, limit) > 0) & in_tissue).sum())
            lo, hi = (mid, hi) if area < target else (lo, mid)
        scale = 0.5 * (lo + hi)
        return scale, float(((field(scale, limit) > 0) & in_tissue).sum())

    scale, area = fit(limit)
    if limit is not None and area < 0.97 * target:
        limit = None  # the deep tissue cannot hold the tumour fraction: let it reach the edge
        scale, _ = fit(limit)
    nodules = [(float(i), float(j), float(scale * r)) for i, j, r in zip(ci, cj, base_r, strict=True)]
    out = field(scale, limit).astype(np.float32)
    # Specks of bed that the outline noise or a gap between fragments cuts off would be
    # counted as nodules by some viewers and not by others: they are removed.
    pieces, _ = ndimage.label((out > 0) & in_tissue, structure=np.ones((3, 3), dtype=bool))
    specks = np.bincount(pieces.ravel()) < _MIN_BED_SAMPLES
    specks[0] = False
    out[specks[pieces]] = -0.1
    return out, nodules


def _nodule_centres(depth: np.ndarray, radii: np.ndarray, at_edge: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Nodule centres (rows, cols) in the tissue, largest nodule first, kept apart where possible.

    Centres prefer deep tissue (weight: depth) so nodules are not mostly cut off by the
    edge; with ``at_edge`` one nodule drawn at random, and each other one with even
    odds, is centred within a third of its radius of the edge instead, so it spills
    over it (several edge nodules let more regions of the slide show tumour at the edge).
    """
    cand = np.flatnonzero(depth > 0)
    cand_depth = depth.ravel()[cand]
    rows, cols = np.unravel_index(cand, depth.shape)
    on_edge = np.zeros(len(radii), dtype=bool)
    if at_edge:
        on_edge = rng.random(len(radii)) < 0.5
        on_edge[rng.integers(len(radii))] = True
    ci = np.zeros(len(radii))
    cj = np.zeros(len(radii))
    placed: list[int] = []
    for k in np.argsort(-radii, kind="stable"):
        if on_edge[k]:
            weight = np.where(cand_depth <= max(1.0, radii[k] / 3.0), 1.0, 0.0)
        else:
            deep = cand_depth >= min(EDGE_MARGIN + radii[k] / 2.0, cand_depth.max())
            weight = np.where(deep, cand_depth, 0.0)
        picks = rng.choice(len(cand), size=_PLACEMENT_TRIES, p=weight / weight.sum())
        if placed:
            gap = np.min([np.hypot(rows[picks] - ci[m], cols[picks] - cj[m]) / (radii[k] + radii[m])
                          for m in placed], axis=0)
            ok = np.flatnonzero(gap >= _NODULE_CLEARANCE)
            pick = picks[ok[0]] if len(ok) else picks[int(np.argmax(gap))]
        else:
            pick = picks[0]
        ci[k], cj[k] = rows[pick], cols[pick]
        placed.append(int(k))
    return ci, cj


def _necrosis_field(
    shape: tuple[int, int],
    bed: np.ndarray,
    nodules: list[tuple[float, float, float]],
    fraction: float,
    at_margin: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Geographic necrosis in the cores of nodules, or against their margins, larger nodules first."""
    yy = np.arange(shape[0], dtype=np.float32)[:, None]
    xx = np.arange(shape[1], dtype=np.float32)[None, :]
    r_max = max(r for _, _, r in nodules)
    core = np.full(shape, -np.inf, np.float32)
    for i, j, r in nodules:
        if at_margin:
            # Centred on the nodule's rim: the necrosis is a cap bordering the tissue outside.
            turn = rng.uniform(0.0, 2.0 * np.pi)
            i, j = i + r * np.sin(turn), j + r * np.cos(turn)
        # Big nodules outgrow their blood supply: weight the core by relative size.
        np.maximum(core, (1.0 - np.hypot(yy - i, xx - j) / r) * (r / r_max) ** 0.7, out=core)
    score = core + 0.3 * value_noise(shape, max(2.0, r_max / 4.0), rng)
    if not at_margin:
        # Core necrosis keeps a rim of viable tumour where the bed leaves room for it.
        score = score - 2.0 * np.exp(-(ndimage.distance_transform_edt(bed) - 1.0) / 2.0)
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
