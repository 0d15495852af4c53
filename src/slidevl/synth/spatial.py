"""Where things lie in a label map: tissue fragments, tumour nodules and how they meet.

Everything is measured on the label map the slide was rendered from (one class per 16
level-0 px), inside one level-0 box (a whole slide or an ROI), so it describes the image
and not the plan: planted nodules that touch are one nodule here, a nodule cut by the
tissue edge is only what is left of it. A box holds the label pixels whose centres lie
inside it, so a piece cut by the box's edge counts as the part inside.

* **fragment**: an 8-connected piece of tissue (any class but background) of at least
  :data:`MIN_FRAGMENT_MM2`; smaller specks are dust.
* **nodule**: an 8-connected piece of tumour bed (tumour or necrosis) of at least
  :data:`MIN_NODULE_MM2`. A count is *ambiguous* when pieces meet only at a corner
  (4- and 8-connectivity count differently) or when a piece lies just under the floor
  (at least half of it): a viewer could count either way.
* **tumour at the tissue edge**: yes when tumour bed borders glass along at least
  :data:`EDGE_CONTACT_UM`; no when every tumour-bed pixel keeps at least
  :data:`EDGE_GAP_UM` of tissue between itself and the glass; in between ambiguous.
* **necrosis inside or next to tumour**: from the share of the necrosis border formed
  by tumour (4-neighbour pairs): at least :data:`INSIDE_SHARE` is *inside* (tumour
  surrounds it), at most :data:`NEXT_TO_SHARE` but above zero is *next to* (it lies at
  the tumour's margin and also borders stroma, fat, lymphocytes or glass); in between,
  necrosis apart from any tumour, or under :data:`MIN_NECROSIS_MM2` of necrosis, no answer.
* **part of the box**: a 3 x 3 grid on the bounding box of the fragments in the box,
  named by :data:`PART_NAMES` ("upper left" ... "centre" ... "lower right"). The
  largest nodule's part is the cell of its centroid; it has none (ambiguous) when the
  centroid lies within :data:`PART_MARGIN` of the cell's side from a grid line, when
  the second nodule is at least :data:`LARGEST_RATIO` of the largest, or when the
  nodule spans at least :data:`FILL_SHARE` of the tissue's box in both directions.

``measure`` returns the measurements and the answers; ``truth.json`` stores the whole
slide's (:meth:`Spatial.as_dict`), the VQA build measures each ROI's box the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .classes import BACKGROUND, NECROSIS, TUMOUR

MIN_FRAGMENT_MM2 = 0.02
MIN_NODULE_MM2 = 0.01
MIN_NECROSIS_MM2 = 0.005
EDGE_CONTACT_UM = 100.0
EDGE_GAP_UM = 40.0
INSIDE_SHARE = 0.9
NEXT_TO_SHARE = 0.7
PART_MARGIN = 0.03
LARGEST_RATIO = 0.8
FILL_SHARE = 2.0 / 3.0
#: Cells of the 3 x 3 grid, row by row from the top left.
PART_NAMES: tuple[str, ...] = (
    "upper left", "upper centre", "upper right",
    "middle left", "centre", "middle right",
    "lower left", "lower centre", "lower right",
)
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Piece:
    """One 8-connected piece (a fragment or a nodule), in level-0 pixels."""

    area_mm2: float
    centroid: tuple[float, float]  # (x, y)
    bbox: tuple[int, int, int, int]  # [x0, y0, x1, y1), on label-pixel edges

    def as_dict(self) -> dict[str, Any]:
        return {"area_mm2": round(self.area_mm2, 5), "centroid": [round(v, 1) for v in self.centroid],
                "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Spatial:
    """Layout of the tissue inside one level-0 box (see the module docstring)."""

    box: tuple[int, int, int, int]
    fragments: tuple[Piece, ...]  # largest first
    nodules: tuple[Piece, ...]  # largest first
    fragments_ambiguous: bool
    nodules_ambiguous: bool
    tumour_edge_contact_um: float  # length of tumour-bed border against glass
    tumour_edge_gap_um: float | None  # tissue between tumour bed and glass (0: touching); None: no bed or no glass
    necrosis_mm2: float
    necrosis_tumour_share: float | None  # share of the necrosis border formed by tumour; None without necrosis

    @property
    def tissue_bbox(self) -> tuple[int, int, int, int] | None:
        """Bounding box of the fragments (dust excluded); None without tissue."""
        if not self.fragments:
            return None
        boxes = np.asarray([f.bbox for f in self.fragments])
        return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))

    @property
    def n_fragments(self) -> int | None:
        return None if self.fragments_ambiguous else len(self.fragments)

    @property
    def n_nodules(self) -> int | None:
        return None if self.nodules_ambiguous else len(self.nodules)

    @property
    def tumour_at_edge(self) -> bool | None:
        """Whether tumour reaches the tissue edge; None without tumour or when ambiguous."""
        if not self.nodules:
            return None
        if self.tumour_edge_contact_um >= EDGE_CONTACT_UM:
            return True
        if self.tumour_edge_gap_um is None or self.tumour_edge_gap_um >= EDGE_GAP_UM:
            return False
        return None

    @property
    def necrosis_relation(self) -> str | None:
        """``"inside"`` or ``"next to"`` the tumour; None when there is no clear answer."""
        share = self.necrosis_tumour_share
        if share is None or self.necrosis_mm2 < MIN_NECROSIS_MM2 or not self.nodules:
            return None
        if share >= INSIDE_SHARE:
            return "inside"
        if 0 < share <= NEXT_TO_SHARE:
            return "next to"
        return None

    @property
    def largest_nodule_part(self) -> str | None:
        """The :data:`PART_NAMES` cell of the largest nodule's centroid; None when ambiguous."""
        box = self.tissue_bbox
        if not self.nodules or box is None:
            return None
        largest = self.nodules[0]
        if len(self.nodules) > 1 and self.nodules[1].area_mm2 >= LARGEST_RATIO * largest.area_mm2:
            return None
        width, height = box[2] - box[0], box[3] - box[1]
        spans = (largest.bbox[2] - largest.bbox[0]) / width, (largest.bbox[3] - largest.bbox[1]) / height
        if min(spans) >= FILL_SHARE:
            return None
        col = _third((largest.centroid[0] - box[0]) / width)
        row = _third((largest.centroid[1] - box[1]) / height)
        return None if col is None or row is None else PART_NAMES[3 * row + col]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready measurements and answers (None where a question has no clear answer)."""
        return {
            "box": list(self.box),
            "tissue_bbox": None if self.tissue_bbox is None else list(self.tissue_bbox),
            "n_fragments": self.n_fragments,
            "n_nodules": self.n_nodules,
            "tumour_at_edge": self.tumour_at_edge,
            "necrosis_relation": self.necrosis_relation,
            "largest_nodule_part": self.largest_nodule_part,
            "fragments": [f.as_dict() for f in self.fragments],
            "nodules": [n.as_dict() for n in self.nodules],
            "fragments_ambiguous": self.fragments_ambiguous,
            "nodules_ambiguous": self.nodules_ambiguous,
            "tumour_edge_contact_um": round(self.tumour_edge_contact_um, 1),
            "tumour_edge_gap_um": None if self.tumour_edge_gap_um is None else round(self.tumour_edge_gap_um, 1),
            "necrosis_mm2": round(self.necrosis_mm2, 5),
            "necrosis_tumour_share": None if self.necrosis_tumour_share is None else round(self.necrosis_tumour_share, 4),
        }


def _third(u: float) -> int | None:
    """Grid column (or row) 0-2 of a relative position, None within the margin of a grid line."""
    for line in (1 / 3, 2 / 3):
        if abs(u - line) < PART_MARGIN:
            return None
    return min(int(u * 3), 2)


def measure(labels: np.ndarray, box: Sequence[float], downsample: int, mpp: float) -> Spatial:
    """The :class:`Spatial` layout of the label pixels whose centres lie inside a level-0 box.

    ``labels`` holds one class per ``downsample`` level-0 pixels of ``mpp`` µm.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    i0, i1 = _centre_range(y0, y1, downsample, labels.shape[0])
    j0, j1 = _centre_range(x0, x1, downsample, labels.shape[1])
    if i1 <= i0 or j1 <= j0:
        raise ValueError(f"box {list(box)} holds no label pixel of a {labels.shape[1]}x{labels.shape[0]} label map "
                         f"(one per {downsample} px)")
    lab = labels[i0:i1, j0:j1]
    origin = (j0 * downsample, i0 * downsample)
    label_um = downsample * mpp
    px_mm2 = (label_um / 1000.0) ** 2
    glass = lab == BACKGROUND
    bed = (lab == TUMOUR) | (lab == NECROSIS)
    necrosis = lab == NECROSIS
    fragments, fragments_ambiguous = _pieces(~glass, origin, downsample, px_mm2, MIN_FRAGMENT_MM2)
    nodules, nodules_ambiguous = _pieces(bed, origin, downsample, px_mm2, MIN_NODULE_MM2)
    gap = None
    if bed.any() and glass.any():
        # Distance between pixel centres to the nearest glass pixel; 1 for a 4-neighbour.
        gap = float(ndimage.distance_transform_edt(~glass)[bed].min() - 1.0) * label_um
    border = _border_counts(necrosis, lab)
    total = sum(border.values())
    return Spatial(
        box=(int(x0), int(y0), int(x1), int(y1)),
        fragments=tuple(fragments),
        nodules=tuple(nodules),
        fragments_ambiguous=fragments_ambiguous,
        nodules_ambiguous=nodules_ambiguous,
        tumour_edge_contact_um=_pairs(bed, glass) * label_um,
        tumour_edge_gap_um=gap,
        necrosis_mm2=float(necrosis.sum()) * px_mm2,
        necrosis_tumour_share=border.get(TUMOUR, 0) / total if total else None,
    )


def _centre_range(lo: float, hi: float, ds: int, n: int) -> tuple[int, int]:
    # Label pixel k is inside when its centre (k + 0.5) * ds lies in [lo, hi).
    return max(0, math.ceil(lo / ds - 0.5)), min(n, math.ceil(hi / ds - 0.5))


def _pieces(mask: np.ndarray, origin: tuple[int, int], ds: int, px_mm2: float,
            min_mm2: float) -> tuple[list[Piece], bool]:
    """Pieces of ``mask`` of at least ``min_mm2`` (largest first) and whether their count is ambiguous."""
    lab8, n8 = ndimage.label(mask, structure=_EIGHT)
    if n8 == 0:
        return [], False
    areas = np.bincount(lab8.ravel(), minlength=n8 + 1)[1:] * px_mm2
    keep = [int(k) for k in np.argsort(-areas, kind="stable") if areas[k] >= min_mm2]
    near_floor = bool(((areas >= min_mm2 / 2) & (areas < min_mm2)).any())
    lab4, n4 = ndimage.label(mask, structure=_FOUR)
    n4_kept = int((np.bincount(lab4.ravel(), minlength=n4 + 1)[1:] * px_mm2 >= min_mm2).sum())
    slices = ndimage.find_objects(lab8)
    centroids = ndimage.center_of_mass(mask, lab8, [k + 1 for k in keep])
    pieces = []
    for k, (cy, cx) in zip(keep, centroids):
        rows, cols = slices[k]
        pieces.append(Piece(
            area_mm2=float(areas[k]),
            centroid=(origin[0] + (cx + 0.5) * ds, origin[1] + (cy + 0.5) * ds),
            bbox=(origin[0] + cols.start * ds, origin[1] + rows.start * ds,
                  origin[0] + cols.stop * ds, origin[1] + rows.stop * ds),
        ))
    return pieces, near_floor or n4_kept != len(keep)


def _pairs(a: np.ndarray, b: np.ndarray) -> int:
    """Number of 4-neighbour pixel pairs with one pixel in ``a`` and the other in ``b``."""
    return int((a[:, :-1] & b[:, 1:]).sum() + (b[:, :-1] & a[:, 1:]).sum()
               + (a[:-1] & b[1:]).sum() + (b[:-1] & a[1:]).sum())


def _border_counts(inner: np.ndarray, lab: np.ndarray) -> dict[int, int]:
    """Class -> number of 4-neighbour pairs between ``inner`` and outside pixels of that class."""
    if not inner.any():
        return {}
    return {int(c): n for c in np.unique(lab[~inner]) if (n := _pairs(inner, ~inner & (lab == c)))}
