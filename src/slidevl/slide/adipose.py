"""Adipose recovery: add the networks of stained membranes that touch tissue.

Adipose tissue defeats the saturation cue: an adipocyte is a clear vacuole inside a
membrane about a micron wide, so an area-averaged overview shows fat as pale as glass.
The membranes stay saturated in the maximum over finer pixels (see
:mod:`slidevl.slide.membranes`). Recovery closes the stained lines (and the tissue) at
the adipocyte scale and adds the closed networks that touch tissue. A closing only fills
gaps narrower than its diameter, so isolated specks (dust) do not grow into tissue.

Reading finer levels is what costs, so membranes are read only where they can change the
mask, at the coarsest level that resolves them, many blocks at a time on threads:

* **Where** is decided on the overview, which is already read. Too thin to saturate an
  overview pixel, membranes still darken it: JPEG keeps luminance at full resolution where
  it halves colour. On the synthetic cohort a fat pixel is 4 grey levels darker than the
  glass (median), and 1 for the tests' 0.5 µm walls, against 0.5 for 99% of glass pixels.
  A block is a candidate when at least half of its glass (past the tissue's blurred edge,
  ``FRINGE_PX``) is darkened beyond the glass's own noise, and it chains to the tissue
  through other candidates. Candidates and their neighbours (the bridge to the tissue) are
  read, with a few blocks of clear glass to learn the finer level's glass from; nothing
  else. Fat that leaves no trace in the overview is not searched.
* **At which level**: the coarse search level first (up to 4x coarser than
  ``adipose_um_per_px``: 2 µm/px on a 0.5 µm/px scan). A pixel there is a line when it is
  above anything that level's glass shows and keeps at least half the contrast of a
  resolved line; the synthetic cohort's ~1 µm walls do. The fine level is read only where
  the coarse one is in doubt: stain too faint to tell (above the level of a line diluted
  into the coarse pixel), chained to the tissue, reaching beyond one closing diameter from
  it, and outside what the clear lines already close; on the synthetic cohort, along the
  outer edge of the fat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slidevl.slide.membranes import MembraneMap, block_any, block_sum
from slidevl.slide.morphology import components, dilated

#: Coarsest search level, as a multiple of the requested membrane resolution. A line keeps at
#: least 1 / (2 * ratio) of its saturation in a pixel this much coarser (half of it may fall in
#: the neighbouring pixel); at 4 that is 1/8, still above clean glass for eosin-stained walls.
MAX_SEARCH_RATIO = 4.0

#: Overview pixels of glass next to the tissue that its blurred edge darkens (on the synthetic
#: slides, the first one by 6-14 grey levels at the median, the second by 0.3).
FRINGE_PX = 2

#: A glass pixel counts as darkened when it is darker than the slide's glass (median) by at
#: least this many grey levels, and by ``DARKENING_NOISE`` standard deviations of the glass's
#: noise (noisier glass needs more evidence).
MIN_DARKENING = 0.5
DARKENING_NOISE = 3.0

#: Fewest glass pixels that let a block count as a candidate.
MIN_BLOCK_GLASS = 16

#: Glass blocks read at the search level to learn its glass: its level and its ceiling, the
#: ``GLASS_CEILING`` percentile of their pixels. They are clear: at most one glass pixel in
#: ``CLEAR_GLASS`` darkened.
GLASS_SAMPLE = 16
GLASS_CEILING = 99.9
CLEAR_GLASS = 16

#: Cell edge (overview pixels) on which the distance from the tissue is measured for
#: ``adipose_reach_um``: ~10x cheaper than an exact distance transform of the overview.
REACH_CELL = 4

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class AdiposeResult:
    networks: np.ndarray  # bool (h, w): closed membrane networks that touch tissue, tissue included
    line_threshold: float | None  # None when the overview showed no candidate (nothing was read)
    read_fractions: tuple[float, ...]  # share of the overview read at each level, coarse first


def closed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk of ``radius`` (skimage's ``disk``), padded so that shapes
    touching the border are not eroded."""
    pad = radius + 1
    grown = dilated(np.pad(mask, pad), radius)
    return ~dilated(~grown, radius)[pad:-pad, pad:-pad]


def recover_adipose(tissue: np.ndarray, rgb: np.ndarray, saturation: np.ndarray, threshold: float, um_per_px: float,
                    radius_um: float, reach_um: float, min_saturation: float,
                    levels: Sequence[MembraneMap]) -> AdiposeResult:
    """Membrane networks that touch ``tissue`` (an overview mask of ``um_per_px`` pixels).

    ``rgb`` and ``saturation`` are the overview and its saturation; ``threshold`` is the
    tissue's saturation threshold. ``levels`` are one (the fine level) or two (a coarse
    search level, then the fine one) :class:`MembraneMap` s over this overview.
    """
    if not 1 <= len(levels) <= 2:
        raise ValueError(f"give the fine membrane level, optionally after a coarse one; got {len(levels)} levels")
    radius = max(1, int(round(radius_um / um_per_px)))
    gap = 2 * radius + 1  # a closing bridges gaps up to its diameter
    search = levels[0]
    zone = ~tissue & _within(tissue, reach_um / um_per_px)
    candidates, sample, glass_pixels = _candidate_blocks(rgb, tissue, zone, gap, search)
    if not candidates.any():
        return AdiposeResult(networks=closed(tissue, radius), line_threshold=None,
                             read_fractions=tuple(0.0 for _ in levels))
    search.read(candidates | sample)
    glass = search.values[glass_pixels & search.pixels_of(sample)]
    if not glass.size:  # tissue and fat all around: the overview's glass stands in
        glass = saturation[glass_pixels]
    glass_level = float(np.median(glass))
    # Halfway between the glass and the tissue threshold: thin membranes lose about half
    # their saturation to JPEG chroma subsampling, and a tinted glass raises both.
    line_threshold = max(min_saturation, (glass_level + threshold) / 2)
    # Lines lie in the candidate blocks, and a closing reaches one diameter from them: all
    # that follows happens in their bounding box with two diameters to spare.
    read = search.pixels_of(candidates)
    box = _bounding_box(read, 2 * gap)
    # Lines are looked for past the tissue's blurred edge: there, any level shows tissue stain.
    tissue_box, searched, values = tissue[box], glass_pixels[box] & read[box], search.values[box]
    if len(levels) == 1:
        lines = searched & (values > line_threshold)
    else:
        fine = levels[1]
        dilution = 2 * search.downsample / fine.downsample
        faint = searched & (values > glass_level + (line_threshold - glass_level) / dilution)
        # Clear at this level: above anything its glass shows, and keeping at least half a
        # resolved line's contrast; fainter stain is left to the fine level.
        lines = faint & (values > max(float(np.percentile(glass, GLASS_CEILING)), (glass_level + line_threshold) / 2))
        if (faint & ~lines).any():
            # In doubt: stain chained to the tissue (JPEG ringing around a speck further
            # out does not reach it) that is not a clear line and lies outside what the
            # clear lines already close. A pale fringe that stays within one closing
            # diameter of the tissue can move its edge by no more than that; fat reaches beyond.
            doubt = (faint & ~lines & _touching(closed(faint | tissue_box, radius), tissue_box)
                     & ~closed(lines | tissue_box, radius))
            wanted = np.zeros_like(tissue)
            wanted[box] = _touching(doubt, zone[box] & ~dilated(tissue_box, gap))
            fine.read(fine.blocks_of(wanted))
            lines |= glass_pixels[box] & (fine.values[box] > line_threshold)
    found = np.zeros_like(tissue)
    found[box] = lines
    return AdiposeResult(networks=_touching(closed(found | tissue, radius), tissue), line_threshold=line_threshold,
                         read_fractions=tuple(level.read_fraction for level in levels))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Slices of the bounding box of ``mask`` (not empty) grown by ``margin``, inside the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (slice(max(0, rows[0] - margin), min(mask.shape[0], rows[-1] + 1 + margin)),
            slice(max(0, cols[0] - margin), min(mask.shape[1], cols[-1] + 1 + margin)))


def _candidate_blocks(rgb: np.ndarray, tissue: np.ndarray, zone: np.ndarray, gap: int,
                      level: MembraneMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where to read membranes: block grids of the candidates and of glass samples, and the glass pixels.

    A block is a candidate when at least half of its glass (``zone`` pixels past the
    tissue's blurred edge) is darker than the slide's glass, and it chains to the tissue
    (within ``gap`` pixels of it) through other candidates; its neighbours are read with
    it, for the bridge to the tissue. Glass samples are clear blocks just beyond that reach.
    """
    # Luminance x 256 (ITU-R 601 weights) in integers: a histogram gives exact medians.
    luma = rgb[..., 0].astype(np.uint16) * 77 + rgb[..., 1].astype(np.uint16) * 150 + rgb[..., 2].astype(np.uint16) * 29
    glass = zone & ~dilated(tissue, FRINGE_PX)
    counts = block_sum(glass, level.block)
    ok = counts >= MIN_BLOCK_GLASS
    if not ok.any():
        return ok, ok, glass
    histogram = np.bincount(luma[glass], minlength=1 << 16)
    glass_luma = _median_of_counts(histogram)
    # Glass noise from the pixels no darker than the median alone (stain only ever darkens,
    # and fat may be much of the glass): half-normal, sigma = 1.4826 x median distance.
    brighter = histogram[int(math.ceil(glass_luma)):]
    noise = 1.4826 * _median_of_counts(brighter) / 256 if brighter.sum() else 0.0
    darker = glass & (luma < glass_luma - 256 * max(MIN_DARKENING, DARKENING_NOISE * noise))
    darker_counts = block_sum(darker, level.block)
    dark = ok & (2 * darker_counts >= counts)
    # Chained to the tissue: a block within one closing diameter of it is that many blocks
    # from one holding tissue, rounded up (one at the default sizes).
    with_tissue = level.blocks_of(tissue)
    near = ndimage.binary_dilation(with_tissue, structure=_EIGHT, iterations=math.ceil(gap / level.block))
    labels, _ = ndimage.label(dark, structure=_EIGHT)
    chained = np.isin(labels, labels[near & dark]) & dark
    candidates = ndimage.binary_dilation(chained, structure=_EIGHT) & level.blocks_of(zone)
    # Glass samples: clear blocks (hardly a darkened pixel) one further out, spread evenly over the slide.
    clear = ok & (darker_counts * CLEAR_GLASS <= counts) & ~candidates & ~with_tissue
    pool = np.flatnonzero(clear & ndimage.binary_dilation(near, structure=_EIGHT))
    sample = np.zeros_like(ok)
    if pool.size:
        sample.flat[pool[np.unique(np.linspace(0, pool.size - 1, min(GLASS_SAMPLE, pool.size)).round().astype(int))]] = True
    return candidates, sample, glass


def _median_of_counts(counts: np.ndarray) -> float:
    """Median of the values whose histogram (value -> count) is ``counts``."""
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    lower = int(np.searchsorted(cumulative, (total + 1) // 2))
    upper = int(np.searchsorted(cumulative, total // 2 + 1))
    return (lower + upper) / 2


def _within(mask: np.ndarray, reach_px: float) -> np.ndarray:
    """Pixels at most ``reach_px`` from ``mask`` (Euclidean), found on ``REACH_CELL``-square cells.

    A pixel counts when the distance from its cell's centre to the nearest centre of a cell
    holding mask, plus as far as two pixels can sit from their cells' centres, is within
    reach: so never farther than ``reach_px``, and always when nearer than ``reach_px`` less
    twice that slack (8.5 px for 4-pixel cells).
    """
    h, w = mask.shape
    if reach_px >= math.hypot(h, w):
        return np.ones_like(mask)
    cell = REACH_CELL
    slack = (cell - 1) * math.sqrt(2)  # two pixels, each up to (cell - 1) / 2 * sqrt(2) from its cell's centre
    cells = block_any(mask, cell)
    near = ndimage.distance_transform_edt(~cells) * cell + slack <= reach_px
    return np.repeat(np.repeat(near, cell, axis=0), cell, axis=1)[:h, :w]


def _touching(mask: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that overlap ``anchor``."""
    labels, n = components(mask)
    touching = np.zeros(n + 1, dtype=bool)
    touching[labels[anchor & mask]] = True
    touching[0] = False
    if touching[1:].all():  # every component touches (or there is none): no pass over the labels
        return mask.copy()
    return touching[labels]
