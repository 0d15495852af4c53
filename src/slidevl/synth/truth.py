"""Ground truth of a synthetic cohort: what was planted, where, and how to look it up.

``truth.json`` holds per patient the planted morphology, oracle risk and outcome, and
per slide its geometry, layout, nodules and class composition per region (the 4096 px
cells of the global grid anchored at level-0 (0, 0)). ``labels/<slide>.png`` holds one
class index per 16x16 level-0 pixels (the table is ``truth.json["classes"]``).

Per slide, ``arrangement`` is how the layout was planned (fragments, tumour at the edge,
marginal necrosis) and ``spatial`` what the label map shows
(:mod:`slidevl.synth.spatial`: fragments and nodules with areas, centroids and boxes,
tumour at the tissue edge, necrosis inside or next to tumour, the largest nodule's part
of the slide); :meth:`SlideTruth.spatial` measures any box the same way.

Other parts look the truth up through :func:`load_truth` and :func:`class_fractions`::

    truth = load_truth("cohort/")
    slide = truth.slides["SYN-0003-01"]
    slide.class_at(12000, 8000)               # 'tumour'
    slide.fractions([0, 0, 4096, 4096])        # {'background': 0.61, 'tumour': 0.2, ...}
    slide.spatial([0, 0, 4096, 4096]).n_nodules  # 2
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .classes import BACKGROUND, CLASSES, LABEL_DS, REGION_PX, TISSUE_CLASSES
from .spatial import Spatial, measure

SCHEMA = "slidevl.synth.truth/1"


def class_fractions(labels: np.ndarray, bbox_level0: Sequence[float], downsample: int = LABEL_DS) -> np.ndarray:
    """Fraction of each class (ordered as :data:`CLASSES`) inside a level-0 bbox.

    ``labels`` is a label map with one class per ``downsample`` x ``downsample`` level-0
    pixels; ``bbox_level0`` is [x0, y0, x1, y1] (x1, y1 exclusive). Label pixels cut by
    the box count by their overlapping area. The box is clipped to the slide; a box
    that misses the slide entirely raises ``ValueError``.
    """
    x0, y0, x1, y1 = (float(v) for v in bbox_level0)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox {list(bbox_level0)} is empty; expected [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    hl, wl = labels.shape
    width, height = wl * downsample, hl * downsample
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if not (cx1 > cx0 and cy1 > cy0):
        raise ValueError(f"bbox {list(bbox_level0)} lies outside the slide (0, 0, {width}, {height})")
    wx, j0, j1 = _overlaps(cx0, cx1, downsample)
    wy, i0, i1 = _overlaps(cy0, cy1, downsample)
    sub = labels[i0:i1, j0:j1]
    weights = wy[:, None] * wx[None, :]
    counts = np.bincount(sub.ravel(), weights=weights.ravel(), minlength=len(CLASSES))[: len(CLASSES)]
    return counts / counts.sum()


def _overlaps(a: float, b: float, ds: int) -> tuple[np.ndarray, int, int]:
    i0 = int(np.floor(a / ds))
    i1 = int(np.ceil(b / ds))
    starts = np.arange(i0, i1, dtype=np.float64) * ds
    w = np.minimum(starts + ds, b) - np.maximum(starts, a)
    return np.clip(w, 0.0, None), i0, i1


def dominant_class(fractions: np.ndarray) -> str:
    """The most abundant tissue class, or ``'background'`` where there is no tissue."""
    tissue = np.asarray(fractions)[list(TISSUE_CLASSES)]
    if tissue.sum() <= 0:
        return CLASSES[BACKGROUND]
    return CLASSES[TISSUE_CLASSES[int(np.argmax(tissue))]]


def fractions_dict(fractions: np.ndarray, digits: int = 5) -> dict[str, float]:
    return {name: round(float(v), digits) for name, v in zip(CLASSES, fractions, strict=True)}


def region_table(labels: np.ndarray, downsample: int = LABEL_DS, region_px: int = REGION_PX) -> list[dict[str, Any]]:
    """Composition of every grid region that overlaps the slide (clipped to the slide)."""
    height, width = labels.shape[0] * downsample, labels.shape[1] * downsample
    out = []
    for row in range(-(-height // region_px)):
        for col in range(-(-width // region_px)):
            bbox = [
                col * region_px,
                row * region_px,
                min((col + 1) * region_px, width),
                min((row + 1) * region_px, height),
            ]
            fr = class_fractions(labels, bbox, downsample)
            out.append(
                {"col": col, "row": row, "bbox": bbox, "fractions": fractions_dict(fr), "dominant": dominant_class(fr)}
            )
    return out


@dataclass(frozen=True)
class NoduleTruth:
    """A planted tumour nodule (level-0 px)."""

    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class RegionTruth:
    """Class composition of one 4096 px grid region (bbox clipped to the slide)."""

    col: int
    row: int
    bbox: tuple[int, int, int, int]
    fractions: dict[str, float]
    dominant: str


@dataclass
class SlideTruth:
    """Truth of one slide. The label map is loaded on first use and kept."""

    slide_id: str
    patient_id: str
    path: Path
    label_path: Path
    width: int
    height: int
    mpp: float
    layout: str  # 'aperio' or 'generic'
    grade: int
    levels: list[tuple[int, int]]
    nodules: list[NoduleTruth]
    composition: dict[str, float]
    regions: list[RegionTruth]
    label_downsample: int = LABEL_DS
    _labels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def labels(self) -> np.ndarray:
        """The (H/16, W/16) ``uint8`` class map."""
        if self._labels is None:
            if not self.label_path.is_file():
                raise FileNotFoundError(
                    f"label map {self.label_path} of slide {self.slide_id} is missing; regenerate the cohort "
                    "with `slidevl synth cohort`"
                )
            lab = np.asarray(Image.open(self.label_path))
            expected = (self.height // self.label_downsample, self.width // self.label_downsample)
            if lab.shape != expected:
                raise ValueError(f"{self.label_path}: label map is {lab.shape}, expected {expected} for this slide")
            self._labels = lab
        return self._labels

    def class_at(self, x: float, y: float) -> str:
        """True class at level-0 pixel (x, y)."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise ValueError(f"({x}, {y}) lies outside slide {self.slide_id} ({self.width}x{self.height})")
        ds = self.label_downsample
        return CLASSES[int(self.labels()[int(y) // ds, int(x) // ds])]

    def fractions(self, bbox_level0: Sequence[float]) -> dict[str, float]:
        """Class fractions inside a level-0 bbox [x0, y0, x1, y1]."""
        return fractions_dict(class_fractions(self.labels(), bbox_level0, self.label_downsample))

    def spatial(self, bbox_level0: Sequence[float] | None = None) -> Spatial:
        """Fragments, nodules and how they meet inside a level-0 bbox (default: the whole slide)."""
        box = (0, 0, self.width, self.height) if bbox_level0 is None else bbox_level0
        return measure(self.labels(), box, self.label_downsample, self.mpp)

    def region_at(self, x: float, y: float) -> RegionTruth:
        """The grid region containing level-0 pixel (x, y)."""
        for r in self.regions:
            if r.bbox[0] <= x < r.bbox[2] and r.bbox[1] <= y < r.bbox[3]:
                return r
        raise ValueError(f"({x}, {y}) lies outside slide {self.slide_id} ({self.width}x{self.height})")


@dataclass(frozen=True)
class PatientTruth:
    """Planted morphology, oracle risk and outcome of one patient."""

    patient_id: str
    grade: int
    tumour_fraction: float
    necrosis_fraction: float
    lymphocyte_infiltration: float
    fat_fraction: float
    n_nodules: int
    risk: float
    t: float
    e: int
    slides: tuple[str, ...]


@dataclass
class CohortTruth:
    """Everything ``truth.json`` says about a cohort, with typed access."""

    root: Path
    classes: tuple[str, ...]
    mpp: float
    label_downsample: int
    region_px: int
    patients: dict[str, PatientTruth]
    slides: dict[str, SlideTruth]
    raw: dict[str, Any] = field(repr=False)

    def slides_of(self, patient_id: str) -> list[SlideTruth]:
        return [self.slides[s] for s in self.patients[patient_id].slides]


def load_truth(cohort_dir: str | os.PathLike[str]) -> CohortTruth:
    """Read ``<cohort_dir>/truth.json`` into a :class:`CohortTruth`."""
    root = Path(cohort_dir)
    path = root / "truth.json"
    if not path.is_file():
        raise InputError(
            f"{path} not found: {root} is not a synthetic cohort (create one with `slidevl synth cohort {root}`)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); regenerate the cohort") from exc
    if raw.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema {raw.get('schema')!r} is not {SCHEMA!r}; regenerate the cohort")
    classes = tuple(raw["classes"])
    if classes != CLASSES:
        raise InputError(f"{path}: class table {list(classes)} differs from this version's {list(CLASSES)}")
    try:
        patients = {
            p["patient_id"]: PatientTruth(
                patient_id=p["patient_id"],
                grade=int(p["morphology"]["grade"]),
                tumour_fraction=float(p["morphology"]["tumour_fraction"]),
                necrosis_fraction=float(p["morphology"]["necrosis_fraction"]),
                lymphocyte_infiltration=float(p["morphology"]["lymphocyte_infiltration"]),
                fat_fraction=float(p["morphology"]["fat_fraction"]),
                n_nodules=int(p["morphology"]["n_nodules"]),
                risk=float(p["risk"]),
                t=float(p["t"]),
                e=int(p["e"]),
                slides=tuple(p["slides"]),
            )
            for p in raw["patients"]
        }
        slides = {
            s["slide_id"]: SlideTruth(
                slide_id=s["slide_id"],
                patient_id=s["patient_id"],
                path=root / s["path"],
                label_path=root / s["label_path"],
                width=int(s["width"]),
                height=int(s["height"]),
                mpp=float(s["mpp"]),
                layout=s["layout"],
                grade=int(s["grade"]),
                levels=[tuple(d) for d in s["levels"]],
                nodules=[NoduleTruth(**n) for n in s["nodules"]],
                composition=dict(s["composition"]),
                regions=[
                    RegionTruth(r["col"], r["row"], tuple(r["bbox"]), dict(r["fractions"]), r["dominant"])
                    for r in s["regions"]
                ],
                label_downsample=int(raw["label_downsample"]),
            )
            for s in raw["slides"]
        }
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed entry ({exc!r}); regenerate the cohort") from exc
    return CohortTruth(
        root=root,
        classes=classes,
        mpp=float(raw["mpp"]),
        label_downsample=int(raw["label_downsample"]),
        region_px=int(raw["region_px"]),
        patients=patients,
        slides=slides,
        raw=raw,
    )
