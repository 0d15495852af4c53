"""Adipose recovery: add the networks of stained membranes that touch tissue.

Adipose tissue defeats the saturation cue: an adipocyte is a clear vacuole inside a
membrane under a micron wide, so an area-averaged overview shows fat as pale as glass.
The membranes stay saturated in the maximum over finer pixels (see
:mod:`slidevl.slide.membranes`). Recovery closes the stained lines (and the tissue) at
the adipocyte scale and adds the closed networks that touch tissue. A closing only fills
gaps narrower than its diameter, so isolated specks (dust) do not grow into tissue.

Reading finer levels is what costs, so membranes are read only where they can change the
mask, and at the coarsest level that finds them:

* A network that touches tissue is a chain of lines, each within one closing diameter of
  the last or of the tissue. Reading starts on the glass within that distance of the
  tissue and grows block by block, only next to blocks where something stained was
  found, never past ``adipose_reach_um``. Glass away from stained lines is never read,
  nor tissue (it counts as lines already).
* The search runs on a coarse level (up to 4x coarser than ``adipose_um_per_px``) with a
  *candidate* threshold low enough that a membrane diluted into the coarser pixels still
  passes. The fine level is read only where the coarse answer is in doubt and could matter:
  candidates chained to the tissue that are not clearly lines and lie outside what the
  clear lines already close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slidevl.slide.membranes import MembraneMap

#: Coarsest search level, as a multiple of the requested membrane resolution. A line keeps at
#: least 1 / (2 * ratio) of its saturation in a pixel this much coarser (half of it may fall in
#: the neighbouring pixel); at 4 that is 1/8, still above clean glass for eosin-stained walls.
MAX_SEARCH_RATIO = 4.0


@dataclass(frozen=True)
class AdiposeResult:
    networks: np.ndarray  # bool (h, w): closed membrane networks that touch tissue, tissue included
    line_threshold: float
    read_fractions: tuple[float, ...]  # share of the overview read at each level, coarse first


def closed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk of ``radius`` (skimage's ``disk``), padded so that shapes
    touching the border are not eroded."""
    pad = radius + 1
    dilated = _dilated(np.pad(mask, pad), radius)
    return ~_dilated(~dilated, radius)[pad:-pad, pad:-pad]


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a disk as the union of its rows, each a horizontal run found from one
    running count of the mask (linear time), ~8x faster than a 2-D structuring element."""
    h, w = mask.shape
    counts = np.zeros((h, w + 2 * radius + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=counts[:, radius + 1 : radius + 1 + w])
    counts[:, radius + 1 + w :] = counts[:, radius + w : radius + 1 + w]
    out = np.zeros_like(mask)
    for half in range(radius + 1):
        width = math.isqrt(radius * radius - half * half)  # the disk's half-width `half` rows off its centre
        # Any mask pixel in columns x - width .. x + width of the row.
        spread = counts[:, radius + 1 + width : radius + 1 + width + w] > counts[:, radius - width : radius - width + w]
        for dy in {half, -half}:  # out[y] |= spread[y + dy]
            out[max(0, -dy) : h - max(0, dy)] |= spread[max(0, dy) : h - max(0, -dy)]
    return out


def recover_adipose(tissue: np.ndarray, threshold: float, um_per_px: float, radius_um: float, reach_um: float,
                    min_saturation: float, levels: Sequence[MembraneMap]) -> AdiposeResult:
    """Membrane networks that touch ``tissue`` (an overview mask of ``um_per_px`` pixels).

    ``levels`` are one (the fine level) or two (a coarse search level, then the fine one)
    :class:`MembraneMap` s over this overview; ``threshold`` is the tissue's saturation threshold.
    """
    if not 1 <= len(levels) <= 2:
        raise ValueError(f"give the fine membrane level, optionally after a coarse one; got {len(levels)} levels")
    radius = max(1, int(round(radius_um / um_per_px)))
    gap = 2 * radius + 1  # a closing bridges gaps up to its diameter
    distance = ndimage.distance_transform_edt(~tissue)
    zone = (distance > 0) & (distance <= reach_um / um_per_px)
    search = levels[0]
    seed = zone & (distance <= gap)
    search.read(search.blocks_of(seed))
    # Halfway between the glass's own level and the tissue threshold: thin membranes lose
    # about half their saturation to JPEG chroma subsampling, and a tinted glass raises both.
    glass = search.values[seed]
    glass_level = float(np.median(glass)) if glass.size else 0.0
    line_threshold = max(min_saturation, (glass_level + threshold) / 2)
    dilution = 2 * search.downsample / levels[-1].downsample if len(levels) == 2 else 1.0
    candidate = glass_level + (line_threshold - glass_level) / dilution
    _grow(search, zone, candidate, gap)
    lines = zone & (search.values > line_threshold)
    if len(levels) == 2:
        fine = levels[1]
        candidates = zone & (search.values > candidate)
        # In doubt: candidates chained to the tissue (JPEG ringing around a stained speck
        # further out reaches the search's blocks but not the tissue) that are not clear lines
        # and lie outside what the clear lines already close.
        doubt = (candidates & ~lines & _touching(closed(candidates | tissue, radius), tissue)
                 & ~closed(lines | tissue, radius))
        # A pale fringe that stays within one closing diameter of the tissue can move its edge
        # by no more than that; fat shows as candidates reaching beyond it.
        fine.read(fine.blocks_of(_touching(doubt, distance > gap)))
        lines |= zone & (fine.values > line_threshold)
    return AdiposeResult(networks=_touching(closed(lines | tissue, radius), tissue), line_threshold=line_threshold,
                         read_fractions=tuple(level.read_fraction for level in levels))


def _grow(level: MembraneMap, zone: np.ndarray, threshold: float, gap: int) -> None:
    """Read outwards from the blocks read so far, next to every block with a pixel above ``threshold``."""
    reach = np.ones((2 * math.ceil(gap / level.block) + 1,) * 2, dtype=bool)
    allowed = level.blocks_of(zone)
    while True:
        found = level.blocks_of(zone & (level.values > threshold))
        wanted = ndimage.binary_dilation(found, structure=reach) & allowed & ~level.done
        if not wanted.any():
            return
        level.read(wanted)


def _touching(mask: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that overlap ``anchor``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    touching = np.zeros(n + 1, dtype=bool)
    touching[labels[anchor & mask]] = True
    touching[0] = False
    return touching[labels]
