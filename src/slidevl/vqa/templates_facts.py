"""Ground-truth facts behind every question: what is really on the slide, the ROI, the window.

Facts come from the synthetic cohort's truth (``truth.json`` and the label maps), never
from the features, so an answer is right because of what is in the image:

* composition: class fractions of the label map inside a level-0 box
  (:func:`slidevl.synth.truth.class_fractions`), re-expressed as fractions of the
  tissue (background excluded);
* grade: the patient's planted tumour grade, which sets the nuclear morphology of
  every tumour pixel of the patient's slides;
* tumour nodules: what a viewer can count, i.e. 8-connected pieces of tumour bed
  (tumour or necrosis) in the label map of at least
  :data:`slidevl.synth.spatial.MIN_NODULE_MM2`. Planted
  nodules that touch merge into one, and slivers cut by the tissue edge do not
  count; the planted count is kept alongside for reference;
* spatial layout of the slide and of each ROI's box (:class:`~slidevl.synth.spatial.Spatial`):
  fragments, nodules, tumour at the tissue edge, necrosis inside or next to tumour, the
  largest nodule's part of the box. Optional: a source that cannot see the layout (an
  LLM) leaves it out and the spatial questions that need it are not asked.

The same facts feed the template questions and, in LLM mode, the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from slidevl.synth.classes import BACKGROUND, CLASSES, TISSUE_CLASSES
from slidevl.synth.spatial import Spatial
from slidevl.synth.truth import SlideTruth, class_fractions
from slidevl.vqa.roi import ROI
from slidevl.vqa.windows import Window

#: Tissue classes in question order, and how questions and options name them.
TISSUE_NAMES: dict[str, str] = {
    "tumour": "tumour",
    "stroma": "fibrous stroma",
    "lymphocytes": "lymphocytic infiltrate",
    "necrosis": "necrosis",
    "fat": "adipose tissue",
}
GRADE_NAMES: dict[int, str] = {
    1: "grade 1 (well differentiated)",
    2: "grade 2 (moderately differentiated)",
    3: "grade 3 (poorly differentiated)",
}
#: Nuclear morphology of each planted grade (what the synthetic renderer draws).
GRADE_MORPHOLOGY: dict[int, str] = {
    1: "small, uniform round nuclei (about 7 µm) arranged around frequent gland-like lumens",
    2: "enlarged nuclei (about 9 µm) with moderate pleomorphism, nucleoli in some cells and occasional lumens",
    3: "large, markedly pleomorphic nuclei (12-20 µm) with coarse chromatin and prominent nucleoli in solid nests",
}
#: A class is "present" in a box when it covers at least this fraction of the tissue there.
PRESENT_FRACTION = 0.05
#: In a high-power window, tumour at or above this fraction of the tissue shows its grade;
#: below NO_TUMOUR_FRACTION the field has no tumour; in between the grade question is not asked.
GRADE_VISIBLE_FRACTION = 0.25
NO_TUMOUR_FRACTION = 0.02
#: Nuclear grade is only shown and asked at this many µm per pixel or finer (20x).
HIGH_POWER_MPP = 0.5


@dataclass(frozen=True)
class Composition:
    """Class make-up of a level-0 box."""

    tissue: dict[str, float]  # tissue class -> fraction of the tissue in the box (sums to 1)
    tissue_fraction: float  # tissue share of the box area

    @classmethod
    def of_box(cls, labels: np.ndarray, bbox: Sequence[float], downsample: int) -> "Composition":
        fractions = class_fractions(labels, bbox, downsample)
        tissue = float(1.0 - fractions[BACKGROUND])
        if tissue <= 0:
            raise ValueError(f"box {list(bbox)} holds no tissue in the label map")
        return cls(
            tissue={CLASSES[c]: float(fractions[c] / tissue) for c in TISSUE_CLASSES},
            tissue_fraction=tissue,
        )

    @property
    def dominant(self) -> str:
        """The most abundant tissue class (ties: class table order)."""
        return max(self.tissue, key=lambda name: (self.tissue[name], -list(self.tissue).index(name)))

    def present(self, threshold: float = PRESENT_FRACTION) -> list[str]:
        """Tissue classes covering at least ``threshold`` of the tissue, in class order."""
        return [name for name, value in self.tissue.items() if value >= threshold]

    def percent(self) -> dict[str, int]:
        """Whole percentages per tissue class (for prompts and answers)."""
        return {name: int(round(100 * value)) for name, value in self.tissue.items()}


@dataclass(frozen=True)
class SlideFacts:
    """What is true of a whole slide."""

    slide_id: str
    patient_id: str
    grade: int
    composition: Composition
    n_nodules: int
    nodule_areas_mm2: tuple[float, ...]
    planted_nodules: int
    tissue_area_mm2: float
    spatial: Spatial | None = None  # None: the source cannot see the layout

    @property
    def has_tumour(self) -> bool:
        """Whether any tumour nodule is visible."""
        return self.n_nodules > 0

    @property
    def countable_nodules(self) -> int | None:
        """The nodule count to ask about: None where the layout shows it is ambiguous."""
        if self.spatial is not None and self.spatial.n_nodules is None:
            return None
        return self.n_nodules

    def as_prompt(self) -> dict[str, Any]:
        """The facts an LLM may use, in plain words and numbers."""
        return {
            "diagnosis": "carcinoma" if self.has_tumour else "no tumour",
            **({"grade": GRADE_NAMES[self.grade], "nuclear_morphology": GRADE_MORPHOLOGY[self.grade]}
               if self.has_tumour else {}),
            "tumour_nodules": self.n_nodules,
            "nodule_areas_mm2": [round(a, 3) for a in self.nodule_areas_mm2],
            "tissue_area_mm2": round(self.tissue_area_mm2, 3),
            "composition_percent_of_tissue": _named_percent(self.composition),
        }


@dataclass(frozen=True)
class RegionFacts:
    """What is true inside one ROI's bbox."""

    slide_id: str
    roi_id: str
    bbox: tuple[int, int, int, int]
    area_mm2: float
    composition: Composition
    grade: int  # the patient's grade; applies to any tumour in the region
    spatial: Spatial | None = None  # None: the source cannot see the layout

    def as_prompt(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "region": self.roi_id,
            "bbox_level0": list(self.bbox),
            "area_mm2": round(self.area_mm2, 3),
            "composition_percent_of_tissue": _named_percent(self.composition),
        }
        if self.composition.tissue["tumour"] >= PRESENT_FRACTION:
            out["tumour_grade"] = GRADE_NAMES[self.grade]
        return out


@dataclass(frozen=True)
class WindowFacts:
    """What is true inside one field of view."""

    slide_id: str
    window_id: str
    roi_id: str
    magnification: str
    mpp: float  # µm per pixel of the view
    size_um: float
    bbox: tuple[int, int, int, int]
    composition: Composition
    grade: int  # the patient's grade; visible only when the field holds tumour

    @property
    def high_power(self) -> bool:
        """Fine enough to judge nuclei (and so the grade)."""
        return self.mpp <= HIGH_POWER_MPP

    @property
    def shows_grade(self) -> bool:
        return self.high_power and self.composition.tissue["tumour"] >= GRADE_VISIBLE_FRACTION

    @property
    def tumour_free(self) -> bool:
        return self.composition.tissue["tumour"] < NO_TUMOUR_FRACTION

    def as_prompt(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "field": f"{self.magnification} field, {self.size_um:.0f} µm wide",
            "bbox_level0": list(self.bbox),
            "composition_percent_of_tissue": _named_percent(self.composition),
        }
        if self.shows_grade:
            out["tumour_grade"] = GRADE_NAMES[self.grade]
            out["nuclear_morphology"] = GRADE_MORPHOLOGY[self.grade]
        elif self.tumour_free:
            out["tumour_grade"] = "no tumour cells in this field"
        return out


def _named_percent(composition: Composition) -> dict[str, int]:
    return {TISSUE_NAMES[name]: value for name, value in composition.percent().items()}


def slide_facts(truth: SlideTruth) -> SlideFacts:
    """Facts of a whole slide from its truth entry and label map."""
    labels = truth.labels()
    ds = truth.label_downsample
    composition = Composition.of_box(labels, [0, 0, truth.width, truth.height], ds)
    label_um = ds * truth.mpp
    spatial = truth.spatial()
    return SlideFacts(
        slide_id=truth.slide_id,
        patient_id=truth.patient_id,
        grade=truth.grade,
        composition=composition,
        n_nodules=len(spatial.nodules),
        nodule_areas_mm2=tuple(n.area_mm2 for n in spatial.nodules),
        planted_nodules=len(truth.nodules),
        tissue_area_mm2=float((labels != BACKGROUND).sum() * (label_um / 1000.0) ** 2),
        spatial=spatial,
    )


def region_facts(truth: SlideTruth, roi: ROI) -> RegionFacts:
    """Facts inside an ROI's bbox."""
    return RegionFacts(
        slide_id=truth.slide_id,
        roi_id=roi.id,
        bbox=roi.bbox,
        area_mm2=roi.tissue_area_mm2,
        composition=Composition.of_box(truth.labels(), roi.bbox, truth.label_downsample),
        grade=truth.grade,
        spatial=truth.spatial(roi.bbox),
    )


def window_facts(truth: SlideTruth, window: Window) -> WindowFacts:
    """Facts inside a window."""
    return WindowFacts(
        slide_id=truth.slide_id,
        window_id=window.id,
        roi_id=window.roi,
        magnification=window.spec.name,
        mpp=window.spec.mpp,
        size_um=window.spec.size_um,
        bbox=window.bbox,
        composition=Composition.of_box(truth.labels(), window.bbox, truth.label_downsample),
        grade=truth.grade,
    )
