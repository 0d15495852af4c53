"""Fields of view cut by physical size around ROI centres, for patch-level questions.

A window is ``size_px`` output pixels at ``mpp`` µm per pixel: "20x" means 0.5 µm/px
and "10x" 1.0 µm/px, so a 512 px window at 10x covers 512 µm whatever the scanner.
Its level-0 side is ``size_px * mpp / slide_mpp`` with the slide's own mpp (as
resolved when the features were made), never by assuming that level 0 is 40x: on a
0.25 µm/px scan a 20x 512 px window spans 1024 level-0 pixels, on a 0.5 µm/px scan 512.

Windows are kept only over tissue: the tissue fraction of a window is the
area-weighted tissue fraction of the feature file's patches under it (patches that
preprocessing dropped for too little tissue count as none). Around each ROI the
candidate centres are the ROI's own patch centres, nearest to the ROI's centroid
first; the first window that passes the filter is used.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from slidevl.config import Config
from slidevl.errors import InputError
from slidevl.features.store import SlideFeatures
from slidevl.vqa.roi import ROI, patch_boxes, slide_mpp

#: Magnification aliases, by the convention that 20x is 0.5 µm per pixel.
MAGNIFICATION_MPP: dict[str, float] = {"40x": 0.25, "20x": 0.5, "10x": 1.0, "5x": 2.0}
# How many candidate centres per ROI are tried before the ROI gets no window.
MAX_CANDIDATES = 32
_SPEC = re.compile(r"^\s*(?P<scale>[0-9.]+\s*(?:x|X|um|µm)?)\s*:\s*(?P<size>\d+)\s*$")


class WindowError(InputError):
    """A window specification or placement is invalid."""


@dataclass(frozen=True)
class WindowSpec(Config):
    """A field of view: ``size_px`` pixels per side at ``mpp`` µm per pixel."""

    name: str
    mpp: float
    size_px: int

    def __post_init__(self) -> None:
        if not self.mpp > 0 or self.size_px < 1:
            raise WindowError(f"window {self.name!r}: mpp must be > 0 and size_px >= 1, got {self.mpp}, {self.size_px}")
        if not re.fullmatch(r"[A-Za-z0-9.]+", self.name):
            raise WindowError(f"window name {self.name!r} may hold only letters, digits and dots (it goes into ids)")

    @property
    def size_um(self) -> float:
        """Physical side length in µm."""
        return self.size_px * self.mpp

    def level0_side(self, slide_mpp: float) -> float:
        """Side length in level-0 pixels of a slide scanned at ``slide_mpp`` µm/px."""
        if not slide_mpp > 0:
            raise WindowError(f"slide mpp must be > 0, got {slide_mpp}")
        return self.size_um / slide_mpp

    @classmethod
    def parse(cls, text: str) -> "WindowSpec":
        """``"20x:512"`` (magnification alias) or ``"0.5um:512"`` / ``"0.5:512"`` (µm per pixel)."""
        m = _SPEC.match(text)
        if m is None:
            raise WindowError(f"window {text!r} must look like 20x:512 or 0.5um:512 (scale:size in pixels)")
        scale = m.group("scale").replace(" ", "").lower().replace("µm", "um")
        size = int(m.group("size"))
        if scale.endswith("x"):
            if scale not in MAGNIFICATION_MPP:
                raise WindowError(
                    f"window {text!r}: unknown magnification {scale}; use one of {', '.join(MAGNIFICATION_MPP)} "
                    "or give µm per pixel, e.g. 0.5um:512"
                )
            return cls(scale, MAGNIFICATION_MPP[scale], size)
        value = float(scale.removesuffix("um"))
        return cls(f"{value:g}um", value, size)


DEFAULT_WINDOWS: tuple[WindowSpec, ...] = (WindowSpec("10x", 1.0, 512), WindowSpec("20x", 0.5, 512))


def window_box(
    centre: Sequence[float], spec: WindowSpec, slide_mpp: float, slide_size: Sequence[int]
) -> tuple[int, int, int, int]:
    """Level-0 box of ``spec`` centred on ``centre``, shifted to lie inside the slide.

    Raises :class:`WindowError` when the window is larger than the slide.
    """
    side = spec.level0_side(slide_mpp)
    width, height = int(slide_size[0]), int(slide_size[1])
    n = int(round(side))
    if n < 1 or n > width or n > height:
        raise WindowError(
            f"window {spec.name} ({spec.size_px} px at {spec.mpp:g} µm/px = {side:.0f} level-0 px at "
            f"{slide_mpp:g} µm/px) does not fit the {width}x{height} slide; choose a smaller --window size"
        )
    x0 = min(max(int(round(centre[0] - side / 2.0)), 0), width - n)
    y0 = min(max(int(round(centre[1] - side / 2.0)), 0), height - n)
    return (x0, y0, x0 + n, y0 + n)


def box_tissue_fractions(windows: np.ndarray, boxes: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Tissue fraction of each window (M, 4) from patch boxes (N, 4) and their tissue fractions (N,)."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 4)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ox = np.clip(np.minimum(windows[:, None, 2], boxes[None, :, 2]) - np.maximum(windows[:, None, 0], boxes[None, :, 0]), 0, None)
    oy = np.clip(np.minimum(windows[:, None, 3], boxes[None, :, 3]) - np.maximum(windows[:, None, 1], boxes[None, :, 1]), 0, None)
    covered = (ox * oy) @ np.asarray(tissue, dtype=np.float64)
    area = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    return np.clip(covered / area, 0.0, 1.0)


@dataclass(frozen=True)
class Window:
    """A kept field of view around one ROI."""

    id: str  # "<roi>-<spec>", e.g. "R1-20x"
    roi: str
    spec: WindowSpec
    bbox: tuple[int, int, int, int]
    tissue_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "roi": self.roi,
            **self.spec.to_dict(),
            "size_um": self.spec.size_um,
            "bbox": list(self.bbox),
            "tissue_fraction": round(self.tissue_fraction, 4),
        }


def slide_size(sf: SlideFeatures) -> tuple[int, int]:
    """Level-0 width and height recorded in a feature file."""
    width, height = sf.attrs.get("slide_width"), sf.attrs.get("slide_height")
    if width is None or height is None:
        raise WindowError(
            f"slide {sf.slide_id}: feature file records no slide_width/slide_height; re-run `slidevl preprocess`"
        )
    return int(width), int(height)


def plan_windows(
    sf: SlideFeatures,
    rois: Sequence[ROI],
    specs: Sequence[WindowSpec] = DEFAULT_WINDOWS,
    *,
    min_tissue: float = 0.5,
) -> tuple[list[Window], list[dict[str, Any]]]:
    """One window per ROI and spec over tissue; returns (kept, rejected) where rejected
    lists ``{"roi", "window", "best_tissue_fraction"}`` for ROIs with no window passing."""
    if not 0.0 <= min_tissue <= 1.0:
        raise WindowError(f"min_tissue must be in [0, 1], got {min_tissue}")
    mpp = slide_mpp(sf)
    size = slide_size(sf)
    boxes = patch_boxes(sf)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    tissue = np.asarray(sf.patch_tissue, dtype=np.float64)
    kept: list[Window] = []
    rejected: list[dict[str, Any]] = []
    for roi in rois:
        members = roi.patch_index
        d2 = ((centres[members] - np.asarray(roi.centroid)) ** 2).sum(1)
        order = members[np.lexsort((members, d2))][:MAX_CANDIDATES]
        for spec in specs:
            cand = np.array([window_box(centres[i], spec, mpp, size) for i in order])
            # Only patches near the candidates matter; this keeps the overlap matrix small on big slides.
            near = (
                (boxes[:, 2] > cand[:, 0].min()) & (boxes[:, 0] < cand[:, 2].max())
                & (boxes[:, 3] > cand[:, 1].min()) & (boxes[:, 1] < cand[:, 3].max())
            )
            fractions = box_tissue_fractions(cand, boxes[near], tissue[near])
            ok = np.nonzero(fractions >= min_tissue)[0]
            if len(ok) == 0:
                rejected.append(
                    {"roi": roi.id, "window": spec.name, "best_tissue_fraction": round(float(fractions.max()), 4)}
                )
                continue
            best = int(ok[0])
            kept.append(
                Window(
                    id=f"{roi.id}-{spec.name}",
                    roi=roi.id,
                    spec=spec,
                    bbox=tuple(int(v) for v in cand[best]),  # type: ignore[arg-type]
                    tissue_fraction=float(fractions[best]),
                )
            )
    return kept, rejected


#: Single-patch fields are described at high power, the scale at which grade shows.
FIELD_SCALE = "20x"


def plan_patch_fields(
    sf: SlideFeatures, rois: Sequence[ROI], n: int, *, seed: int, min_tissue: float = 0.5
) -> list[Window]:
    """Up to ``n`` fields of exactly one feature patch each, drawn without replacement.

    Only patches of the given ROIs with at least ``min_tissue`` tissue are drawn; each
    field names its ROI, so its questions can be chained to that region. The draw depends
    on ``seed`` and the slide id alone.
    """
    if n < 0:
        raise WindowError(f"the number of patch fields must be >= 0, got {n}")
    boxes = patch_boxes(sf)
    tissue = np.asarray(sf.patch_tissue, dtype=np.float64)
    owner = {int(i): roi.id for roi in rois for i in roi.patch_index}
    eligible = np.array(sorted(i for i in owner if tissue[i] >= min_tissue), dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(sf.slide_id.encode())])
    chosen = np.sort(rng.choice(eligible, size=min(n, len(eligible)), replace=False)) if len(eligible) else eligible
    mpp, level0_mpp = MAGNIFICATION_MPP[FIELD_SCALE], slide_mpp(sf)
    fields = []
    for i in chosen.tolist():
        box = tuple(int(v) for v in boxes[i])
        spec = WindowSpec(FIELD_SCALE, mpp, max(1, int(round((box[2] - box[0]) * level0_mpp / mpp))))
        fields.append(Window(id=f"P{i}-{FIELD_SCALE}", roi=owner[i], spec=spec, bbox=box,  # type: ignore[arg-type]
                             tissue_fraction=float(tissue[i])))
    return fields
