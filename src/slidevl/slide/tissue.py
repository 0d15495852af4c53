"""Tissue segmentation on a low-resolution overview: HSV saturation, Otsu, morphology.

Stained tissue is saturated, glass is not. The saturation channel is median-filtered,
thresholded with Otsu (or a fixed override, never below a floor so that an empty slide
stays empty), closed, cleaned of small specks and filled where holes are small. Sizes
are given in physical units (µm, µm²) so the same parameters work at any scan mpp.

Adipose tissue defeats the saturation cue: an adipocyte is a clear vacuole inside a
membrane under a micron wide, so an area-averaged overview shows fat as pale as glass.
The membranes stay saturated at about 1 µm/px, though. Adipose recovery therefore reads
the slide at that resolution, keeps each overview pixel's *highest* saturation (a max, so
the thin lines survive the downsampling), closes the network of stained lines at the
adipocyte scale and adds the closed networks that touch tissue. A closing only fills gaps
between lines narrower than its diameter, so isolated specks (dust) do not grow into tissue.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import rank, threshold_otsu
from skimage.morphology import disk

from slidevl.slide.reader import Slide
from slidevl.tiling.grid import SlideGrid


@dataclass(frozen=True)
class TissueParams:
    """Segmentation parameters; all of them are recorded in the feature store."""

    downsample: float = 16.0  # overview resolution relative to level 0 (ignored when level is set)
    level: int | None = None  # read this pyramid level as-is instead
    saturation_threshold: float | None = None  # fixed threshold (0-255); None = Otsu
    min_saturation: float = 20.0  # floor under Otsu: glass alone never becomes tissue
    median_size: int = 7  # median filter width in overview pixels
    closing_radius_um: float = 16.0
    min_object_area_um2: float = 20_000.0
    max_hole_area_um2: float = 50_000.0  # holes up to this area are filled; 0 keeps every hole
    adipose_radius_um: float = 50.0  # close stained-line networks up to this radius (adipocytes); 0 = off
    adipose_um_per_px: float = 1.0  # resolution at which membranes are read for adipose recovery
    adipose_reach_um: float = 2000.0  # membranes are read (and fat recovered) up to this far from tissue

    def __post_init__(self) -> None:
        if not self.downsample >= 1:
            raise ValueError(f"tissue downsample must be >= 1, got {self.downsample}")
        if self.level is not None and self.level < 0:
            raise ValueError(f"tissue level must be >= 0, got {self.level}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise ValueError(f"saturation threshold must be in 0..255, got {self.saturation_threshold}")
        for name in ("median_size", "closing_radius_um", "min_object_area_um2", "max_hole_area_um2", "min_saturation",
                     "adipose_radius_um", "adipose_reach_um"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.adipose_um_per_px > 0:
            raise ValueError(f"adipose_um_per_px must be > 0, got {self.adipose_um_per_px}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TissueMask:
    """Binary tissue mask covering the whole slide at a known scale."""

    mask: np.ndarray  # bool (h, w)
    scale_x: float  # level-0 pixels per mask pixel
    scale_y: float
    threshold: float
    level: int
    params: TissueParams
    line_threshold: float | None = None  # fine-level membrane threshold when adipose recovery ran

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def attrs(self) -> dict[str, object]:
        return {
            **self.params.as_dict(),
            "threshold_used": self.threshold,
            "adipose_threshold_used": self.line_threshold,
            "read_level": self.level,
            "mask_shape": list(self.mask.shape),
            "mask_scale": [self.scale_x, self.scale_y],
        }

    def patch_fractions(self, grid: SlideGrid) -> np.ndarray:
        """(n_rows, n_cols) float32 fraction of each grid patch covered by tissue.

        Exact area coverage of the piecewise-constant mask: the integral image is
        bilinear inside each mask pixel, so interpolating it at fractional box corners
        gives the covered area. Done one patch row at a time so memory stays small.
        """
        n_rows, n_cols = grid.n_rows, grid.n_cols
        out = np.zeros((n_rows, n_cols), dtype=np.float32)
        if n_rows == 0 or n_cols == 0:
            return out
        h, w = self.mask.shape
        xs = grid.patch_edges(np.arange(n_cols + 1)) / self.scale_x
        ys = grid.patch_edges(np.arange(n_rows + 1)) / self.scale_y
        u = np.clip(xs, 0, w)
        u_i = np.minimum(np.floor(u).astype(np.int64), w - 1)
        u_f = u - u_i
        for r in range(n_rows):
            v0, v1 = min(ys[r], h), min(ys[r + 1], h)
            b0, b1 = int(math.floor(v0)), min(h, int(math.ceil(v1)))
            if b1 <= b0:
                continue
            band = self.mask[b0:b1].astype(np.int32)
            integral = np.zeros((b1 - b0 + 1, w + 1), dtype=np.int64)
            integral[1:, 1:] = band.cumsum(0).cumsum(1)
            f0 = _bilinear(integral, v0 - b0, u_i, u_f)
            f1 = _bilinear(integral, v1 - b0, u_i, u_f)
            col = f1 - f0  # tissue area between v0 and v1 left of each x edge
            area = np.diff(col)
            box = np.diff(xs) * (ys[r + 1] - ys[r])
            out[r] = np.clip(area / box, 0.0, 1.0)
        return out


def _bilinear(integral: np.ndarray, v: float, u_i: np.ndarray, u_f: np.ndarray) -> np.ndarray:
    v_i = min(int(math.floor(v)), integral.shape[0] - 2)
    v_f = v - v_i
    top = integral[v_i, u_i] * (1 - u_f) + integral[v_i, u_i + 1] * u_f
    bottom = integral[v_i + 1, u_i] * (1 - u_f) + integral[v_i + 1, u_i + 1] * u_f
    return top * (1 - v_f) + bottom * v_f


def _saturation_table() -> np.ndarray:
    hi = np.arange(256, dtype=np.int32)[:, None]
    lo = np.arange(256, dtype=np.int32)[None, :]
    table = np.where(hi > 0, np.clip(hi - lo, 0, None) * 255 // np.maximum(hi, 1), 0)
    return table.astype(np.uint8)


_SATURATION = _saturation_table()  # [max channel, min channel] -> saturation; a lookup is ~10x faster


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0..255 (uint8), computed without a float HSV image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return _SATURATION[np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)]


def _closed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk, padded so that shapes touching the border are not eroded."""
    pad = radius + 1
    return ndimage.binary_closing(np.pad(mask, pad), structure=disk(radius).astype(bool))[pad:-pad, pad:-pad]


def _components_at_most(mask: np.ndarray, max_px: float, *, keep_border: bool = False) -> np.ndarray:
    """Boolean map of 8-connected components of ``mask`` with area <= ``max_px`` pixels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_px
    small[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[border] = False
    return small[labels]


#: Given the overview pixels worth reading (bool), their fine-level maximum saturation (uint8, 0 elsewhere).
LineReader = Callable[[np.ndarray], np.ndarray]


def segment_image(rgb: np.ndarray, um_per_px: float, params: TissueParams, *, scale: tuple[float, float] = (1.0, 1.0),
                  level: int = 0, read_lines: LineReader | None = None) -> TissueMask:
    """Segment an overview ``rgb`` whose pixels are ``um_per_px`` microns wide.

    ``read_lines`` turns on adipose recovery when ``params.adipose_radius_um`` is positive:
    given the overview pixels worth reading, it returns their fine-level maximum
    saturation (see :func:`max_saturation`).
    """
    sat = saturation(rgb)
    if params.median_size > 1:
        sat = rank.median(sat, footprint=np.ones((params.median_size, params.median_size), dtype=bool))
    if params.saturation_threshold is not None:
        threshold = float(params.saturation_threshold)
    else:
        # A uniform image (blank glass) has no two classes to split: only the floor applies.
        otsu = float(threshold_otsu(sat)) if sat.size and sat.min() != sat.max() else 0.0
        threshold = max(otsu, params.min_saturation)
    mask = sat > threshold
    line_threshold = None
    radius = int(round(params.closing_radius_um / um_per_px))
    if radius >= 1 and mask.any():
        mask = _closed(mask, radius)
    if read_lines is not None and params.adipose_radius_um > 0 and mask.any():
        radius_px = params.adipose_radius_um / um_per_px
        zone = _adipose_zone(mask, radius_px, params.adipose_reach_um / um_per_px)
        lines = read_lines(zone)
        if lines.shape != mask.shape:
            raise ValueError(f"line saturation map {lines.shape} does not match the overview {mask.shape}")
        # Halfway between the glass's own level and the tissue threshold: thin membranes lose
        # about half their saturation to JPEG chroma subsampling, and a tinted glass raises both.
        glass = lines[zone & ~mask]
        glass_level = float(np.median(glass)) if glass.size else 0.0
        line_threshold = max(params.min_saturation, (glass_level + threshold) / 2)
        mask |= _line_networks(lines > line_threshold, mask, radius_px)
    px_area = um_per_px * um_per_px
    if params.min_object_area_um2 > 0:
        # Objects strictly smaller than the minimum area go.
        mask &= ~_components_at_most(mask, math.ceil(params.min_object_area_um2 / px_area) - 1)
    if params.max_hole_area_um2 > 0:
        mask |= _components_at_most(~mask, params.max_hole_area_um2 / px_area, keep_border=True)
    return TissueMask(mask=mask, scale_x=scale[0], scale_y=scale[1], threshold=threshold, level=level, params=params,
                      line_threshold=line_threshold)


def _adipose_zone(tissue: np.ndarray, radius_px: float, reach_px: float) -> np.ndarray:
    """Overview pixels whose membranes can change the result: glass within reach of tissue,
    and tissue within the closing's diameter of its edge (deeper tissue is tissue already)."""
    outside = ndimage.distance_transform_edt(~tissue) <= reach_px
    rim = ndimage.distance_transform_edt(tissue) <= 2 * radius_px + 1
    return outside & rim


def _line_networks(lines: np.ndarray, tissue: np.ndarray, radius_px: float) -> np.ndarray:
    """Networks of stained lines, closed at ``radius_px``, that touch ``tissue``."""
    closed = _closed(lines, max(1, int(round(radius_px))))
    labels, n = ndimage.label(closed, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return closed
    touching = np.zeros(n + 1, dtype=bool)
    touching[labels[tissue & closed]] = True
    touching[0] = False
    return touching[labels]


def max_saturation(slide: Slide, level: int, shape: tuple[int, int], zone: np.ndarray | None = None,
                   tile: int = 64) -> np.ndarray:
    """(h, w) uint8: per overview pixel, the highest saturation of the ``level`` pixels under it.

    ``shape`` is the overview's; the level must be at least as fine. Only ``tile``-square
    blocks of the overview that hold a ``zone`` pixel are read (all when ``zone`` is None);
    pixels outside the zone are 0. Memory stays bounded by one block whatever the slide's size.
    """
    out_h, out_w = shape
    lw, lh = slide.level_dimensions[level]
    fx, fy = lw / out_w, lh / out_h
    if fx < 1 - 1e-6 or fy < 1 - 1e-6:
        raise ValueError(f"{slide.path}: level {level} ({lw}x{lh}) is coarser than the {out_w}x{out_h} overview")
    if zone is not None and zone.shape != tuple(shape):
        raise ValueError(f"zone {zone.shape} does not match the overview {tuple(shape)}")
    ds = slide.level_downsamples[level]
    row_edges = np.append(np.floor(np.arange(out_h) * fy).astype(np.int64), lh)
    col_edges = np.append(np.floor(np.arange(out_w) * fx).astype(np.int64), lw)
    out = np.zeros(shape, dtype=np.uint8)
    for r0 in range(0, out_h, tile):
        r1 = min(out_h, r0 + tile)
        y0, y1 = int(row_edges[r0]), int(row_edges[r1])
        for c0 in range(0, out_w, tile):
            c1 = min(out_w, c0 + tile)
            if zone is not None and not zone[r0:r1, c0:c1].any():
                continue
            x0, x1 = int(col_edges[c0]), int(col_edges[c1])
            block = slide.read_region_image((int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0))
            rows = np.maximum.reduceat(saturation(np.asarray(block)), row_edges[r0:r1] - y0, axis=0)
            out[r0:r1, c0:c1] = np.maximum.reduceat(rows, col_edges[c0:c1] - x0, axis=1)
    if zone is not None:
        out[~zone] = 0
    return out


def segment_slide(slide: Slide, mpp: float, params: TissueParams) -> tuple[TissueMask, np.ndarray]:
    """Read the slide's overview (see :class:`TissueParams`) and segment it.

    Returns the mask and the RGB overview it was computed on (reused for the QC picture
    and the global thumbnail feature, so the slide is read at low resolution once).
    """
    if params.level is not None:
        if params.level >= slide.level_count:
            raise ValueError(f"{slide.path}: tissue level {params.level} does not exist (slide has {slide.level_count})")
        overview, level = slide.read_downsampled(level=params.level)
    else:
        overview, level = slide.read_downsampled(params.downsample)
    w0, h0 = slide.dimensions
    scale = (w0 / overview.shape[1], h0 / overview.shape[0])
    um_per_px = mpp * math.sqrt(scale[0] * scale[1])
    fine = min(slide.best_level(params.adipose_um_per_px / mpp), level)

    def read_lines(zone: np.ndarray) -> np.ndarray:
        return max_saturation(slide, fine, overview.shape[:2], zone)

    return segment_image(overview, um_per_px, params, scale=scale, level=level, read_lines=read_lines), overview
