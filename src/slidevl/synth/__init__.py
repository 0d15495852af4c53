"""Synthetic H&E-like cohorts with planted ground truth: the embedded default dataset.

``make_cohort`` renders pyramidal TIFF slides (Aperio and generic layouts) with a
clinical table, patient-level splits, per-slide label maps and ``truth.json``;
``load_truth`` and ``class_fractions`` look the planted truth up again.
"""

from .classes import CLASS_INDEX, CLASSES, LABEL_DS, MPP, REGION_PX
from .cohort import CohortInfo, make_cohort
from .truth import CohortTruth, SlideTruth, class_fractions, load_truth

__all__ = [
    "CLASSES",
    "CLASS_INDEX",
    "LABEL_DS",
    "MPP",
    "REGION_PX",
    "CohortInfo",
    "CohortTruth",
    "SlideTruth",
    "class_fractions",
    "load_truth",
    "make_cohort",
]
