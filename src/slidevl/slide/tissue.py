"""Tissue segmentation on a low-resolution overview: HSV saturation, Otsu, morphology.

Stained tissue is saturated, glass is not. The saturation channel is thresholded with
Otsu (or a fixed override, never below a floor so that an empty slide stays empty) after a
median filter, closed, cleaned of small specks and filled where holes are small. Sizes
are given in physical units (µm, µm²) so the same parameters work at any scan mpp.
Fat, as pale as glass in the overview, is recovered from its membranes at finer levels
(:mod:`slidevl.slide.adipose`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from slidevl.config import Config, setting
from slidevl.cpus import available_cpus
from slidevl.errors import ConfigError
from slidevl.slide.adipose import MAX_SEARCH_RATIO, closed, recover_adipose
from slidevl.slide.membranes import MembraneMap, saturation, slide_block_reader
from slidevl.slide.morphology import components
from slidevl.slide.reader import Slide
from slidevl.slide.tiffreads import TiffFirst
from slidevl.tiling.grid import SlideGrid


@dataclass(frozen=True)
class TissueParams(Config):
    """Segmentation parameters; all of them are recorded in the feature store.

    ``slidevl preprocess`` takes its tissue options from these fields (the ``flag`` names
    are the options' historical spellings).
    """

    downsample: float = setting(16.0, flag="--seg-downsample",
                                help="Tissue segmentation resolution: level-0 size / this (ignored with --seg-level).")
    level: int | None = setting(None, flag="--seg-level", help="Segment on this pyramid level instead of --seg-downsample.")
    saturation_threshold: float | None = setting(None, help="Fixed HSV saturation threshold 0-255 (default: Otsu).")
    min_saturation: float = setting(20.0, help="Floor under the Otsu threshold (keeps blank glass empty).")
    median_size: int = setting(7, help="Median filter width in overview pixels before thresholding.")
    closing_radius_um: float = setting(16.0, help="Morphological closing radius in µm.")
    min_object_area_um2: float = setting(20_000.0, flag="--min-object-um2", help="Drop tissue pieces smaller than this (µm²).")
    max_hole_area_um2: float = setting(50_000.0, flag="--max-hole-um2", help="Fill holes up to this area (µm²); 0 keeps all holes.")
    adipose_radius_um: float = setting(
        50.0, help="Recover adipose tissue: close networks of stained membranes up to this radius (µm); 0 = off.")
    adipose_um_per_px: float = setting(
        1.0, help="Finest resolution (µm/px) at which membranes are read for adipose recovery (a level up to 4x "
                  "coarser is searched first; the fine one is read only where that is in doubt).")
    adipose_reach_um: float = setting(
        2000.0, help="Read membranes (and recover fat) up to this far from the saturated tissue (µm).")

    def __post_init__(self) -> None:
        if not self.downsample >= 1:
            raise ConfigError(f"tissue downsample must be >= 1, got {self.downsample}")
        if self.level is not None and self.level < 0:
            raise ConfigError(f"tissue level must be >= 0, got {self.level}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise ConfigError(f"saturation threshold must be in 0..255, got {self.saturation_threshold}")
        for name in ("median_size", "closing_radius_um", "min_object_area_um2", "max_hole_area_um2", "min_saturation",
                     "adipose_radius_um", "adipose_reach_um"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.adipose_um_per_px > 0:
            raise ConfigError(f"adipose_um_per_px must be > 0, got {self.adipose_um_per_px}")


@dataclass
class TissueMask:
    """Binary tissue mask covering the whole slide at a known scale."""

    mask: np.ndarray  # bool (h, w)
    scale_x: float  # level-0 pixels per mask pixel
    scale_y: float
    threshold: float
    level: int
    params: TissueParams
    line_threshold: float | None = None  # membrane threshold when adipose recovery ran
    adipose_levels: tuple[int, ...] = ()  # pyramid levels membranes were read at, coarse first
    adipose_read: tuple[float, ...] = ()  # share of the overview read at each of them

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def attrs(self) -> dict[str, object]:
        return {
            **self.params.to_dict(),
            "threshold_used": self.threshold,
            "adipose_threshold_used": self.line_threshold,
            "adipose_levels_read": list(self.adipose_levels),
            "adipose_read_fraction": [round(f, 4) for f in self.adipose_read],
            "read_level": self.level,
            "mask_shape": list(self.mask.shape),
            "mask_scale": [self.scale_x, self.scale_y],
        }

    def patch_fractions(self, grid: SlideGrid) -> np.ndarray:
        """(n_rows, n_cols) float32 fraction of each grid patch covered by tissue.

        Exact area coverage of the piecewise-constant mask: the integral image is
        bilinear inside each mask pixel, so interpolating it at fractional box corners
        gives the covered area. It is formed only at the patch row edges, from sums of
        the mask rows between them: one pass over the mask, memory of a few mask rows.
        """
        n_rows, n_cols = grid.n_rows, grid.n_cols
        out = np.zeros((n_rows, n_cols), dtype=np.float32)
        if n_rows == 0 or n_cols == 0 or self.mask.size == 0:
            return out
        h, w = self.mask.shape
        xs = grid.patch_edges(np.arange(n_cols + 1)) / self.scale_x
        ys = grid.patch_edges(np.arange(n_rows + 1)) / self.scale_y
        u = np.clip(xs, 0, w)
        u_i = np.minimum(np.floor(u).astype(np.int64), w - 1)
        u_f = (u - u_i)[None, :]
        v = np.minimum(ys, h)
        v_i = np.minimum(np.floor(v).astype(np.int64), h - 1)
        v_f = (v - v_i)[:, None]
        # Tissue per mask column between consecutive row edges: the whole mask rows in between
        # (one pass over the mask, no integral image), then the fractional rows at both ends.
        whole = np.add.reduceat(self.mask, v_i, axis=0, dtype=np.int64)[:-1]
        whole[v_i[1:] == v_i[:-1]] = 0  # reduceat gives the row itself for an empty range
        between = whole + np.diff(self.mask[v_i] * v_f, axis=0)
        # Left of each column edge: cumulative along the row, bilinear inside a mask pixel.
        left = np.zeros((n_rows, w + 1))
        np.cumsum(between, axis=1, out=left[:, 1:])
        area = np.diff(left[:, u_i] * (1 - u_f) + left[:, u_i + 1] * u_f, axis=1)
        out[:] = np.clip(area / (np.diff(ys)[:, None] * np.diff(xs)[None, :]), 0.0, 1.0)
        return out


def _median_above(values: np.ndarray, size: int, threshold: float) -> np.ndarray:
    """Where the median of each ``size`` x ``size`` window of ``values`` is above ``threshold``.

    A window's median (the upper one of an even count, as skimage's rank median takes it)
    is above the threshold exactly when at least half of the window is, so this counts the
    pixels above it with an unnormalised box filter (exact integer sums, zeros outside)
    instead of sorting every window: the same mask as thresholding ``rank.median``, over 50x
    faster (the box filter ~3x faster than numpy shifted sums). Windows are cut at the border, as there.
    """
    above = np.ascontiguousarray(values > threshold).view(np.uint8)
    before, after = size // 2, size - size // 2 - 1  # window rows (columns) before and after its centre
    counts = cv2.boxFilter(above, cv2.CV_32S if size * size > 65535 else cv2.CV_16U, (size, size),
                           anchor=(before, before), normalize=False, borderType=cv2.BORDER_CONSTANT)
    spans = []
    for axis in (0, 1):
        idx = np.arange(values.shape[axis], dtype=np.int32)
        spans.append(np.minimum(idx + after, values.shape[axis] - 1) - np.maximum(idx - before, 0) + 1)
    half = (spans[0][:, None] * spans[1][None, :] + 1) // 2  # at least half of the window inside the image
    return counts >= half


def _components_at_most(mask: np.ndarray, max_px: float, *, keep_border: bool = False) -> np.ndarray:
    """Boolean map of 8-connected components of ``mask`` with area <= ``max_px`` pixels."""
    labels, n = components(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= max_px
    small[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[border] = False
    if not small.any():  # usually so for holes: skip a pass over the labels
        return np.zeros_like(mask)
    return small[labels]


def segment_image(rgb: np.ndarray, um_per_px: float, params: TissueParams, *, scale: tuple[float, float] = (1.0, 1.0),
                  level: int = 0, membranes: Sequence[MembraneMap] = ()) -> TissueMask:
    """Segment an overview ``rgb`` whose pixels are ``um_per_px`` microns wide.

    ``membranes`` (a coarse search level and the fine level, or the fine level alone, as
    :class:`MembraneMap` s over this overview) turn on adipose recovery when
    ``params.adipose_radius_um`` is positive.
    """
    sat = saturation(rgb)
    if params.saturation_threshold is not None:
        threshold = float(params.saturation_threshold)
    else:
        # Otsu on the saturation itself: on the median-filtered saturation it moved by at most
        # one level on the synthetic slides, and the median filter alone cost more than the rest.
        # A uniform image (blank glass) has no two classes to split: only the floor applies.
        otsu = float(threshold_otsu(sat)) if sat.size and sat.min() != sat.max() else 0.0
        threshold = max(otsu, params.min_saturation)
    mask = _median_above(sat, params.median_size, threshold) if params.median_size > 1 else sat > threshold
    radius = int(round(params.closing_radius_um / um_per_px))
    if radius >= 1 and mask.any():
        mask = closed(mask, radius)
    adipose = None
    if membranes and params.adipose_radius_um > 0 and mask.any():
        adipose = recover_adipose(mask, rgb, sat, threshold, um_per_px, params.adipose_radius_um,
                                  params.adipose_reach_um, params.min_saturation, membranes)
        mask |= adipose.networks
    px_area = um_per_px * um_per_px
    if params.min_object_area_um2 > 0:
        # Objects strictly smaller than the minimum area go.
        mask &= ~_components_at_most(mask, math.ceil(params.min_object_area_um2 / px_area) - 1)
    if params.max_hole_area_um2 > 0:
        mask |= _components_at_most(~mask, params.max_hole_area_um2 / px_area, keep_border=True)
    return TissueMask(mask=mask, scale_x=scale[0], scale_y=scale[1], threshold=threshold, level=level, params=params,
                      line_threshold=adipose.line_threshold if adipose else None,
                      adipose_levels=tuple(m.level for m in membranes) if adipose else (),
                      adipose_read=adipose.read_fractions if adipose else ())


#: Overview pixels per edge of the blocks in which membranes are searched (at the default
#: 16x overview, a quarter of a 256 px JPEG tile of the 4x level), and in which the fine
#: level is read where the search is in doubt: doubt lies in thin bands along the fat's edge,
#: and OpenSlide reads a 64 px window of a tile in a third of the time of the whole tile.
MEMBRANE_BLOCK = 16
FINE_BLOCK = 4


def membrane_levels(slide: Slide, mpp: float, params: TissueParams, overview_level: int) -> list[int]:
    """Pyramid levels to read membranes at: a coarse search level if the pyramid has one
    between the fine level and the overview, then the fine level (at most the overview's)."""
    fine = min(slide.best_level(params.adipose_um_per_px / mpp), overview_level)
    fine_ds = slide.level_downsamples[fine]
    search = slide.best_level(fine_ds * MAX_SEARCH_RATIO)
    return [search, fine] if fine < search < overview_level else [fine]


def segment_slide(slide: Slide, mpp: float, params: TissueParams) -> tuple[TissueMask, np.ndarray]:
    """Read the slide's overview (see :class:`TissueParams`) and segment it.

    Returns the mask and the RGB overview it was computed on (reused for the QC picture
    and the global thumbnail feature, so the slide is read at low resolution once).
    """
    if params.level is not None and params.level >= slide.level_count:
        raise ValueError(f"{slide.path}: tissue level {params.level} does not exist (slide has {slide.level_count})")
    # Every read below goes through tifffile where it gives OpenSlide's pixels, at a fraction of the cost.
    with TiffFirst(slide) as reads, ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        if params.level is not None:
            overview, level = reads.read_downsampled(level=params.level)
        else:
            overview, level = reads.read_downsampled(params.downsample)
        w0, h0 = slide.dimensions
        scale = (w0 / overview.shape[1], h0 / overview.shape[0])
        um_per_px = mpp * math.sqrt(scale[0] * scale[1])
        shape = overview.shape[:2]
        levels = membrane_levels(slide, mpp, params, level)
        membranes = [MembraneMap(shape, FINE_BLOCK if i else MEMBRANE_BLOCK, lv, slide.level_downsamples[lv],
                                 slide_block_reader(reads, lv, shape), pool) for i, lv in enumerate(levels)]
        tissue = segment_image(overview, um_per_px, params, scale=scale, level=level, membranes=membranes)
    return tissue, overview
