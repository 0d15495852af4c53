"""Build a complete synthetic cohort: slides, labels, clinical table, splits, truth.

Layout of the output folder::

    OUT/slides/<slide_id>.tiff     pyramidal JPEG TIFF (Aperio, or generic for some)
    OUT/labels/<slide_id>.png      class index per 16x16 level-0 px (see truth.json)
    OUT/clinical.csv               pathology_id,patient_id,e,t  (t in months)
    OUT/splits/splits_{0..4}.csv   patient-level, event-stratified folds (TCGA format)
    OUT/truth.json                 planted morphology, risk, outcome, regions, nodules, spatial layout

``truth.json`` is written last, so its presence marks a complete cohort.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__
from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..errors import InputError
from ..splits import make_patient_splits, write_splits
from .classes import CLASS_INDEX, CLASSES, LABEL_DS, MPP, REGION_PX
from .layout import make_layout
from .model import (
    CENSOR_LOG_SD,
    CENSOR_MEDIAN_MONTHS,
    MAX_FOLLOW_UP_MONTHS,
    RISK_COEFS,
    WEIBULL_SHAPE,
    PatientDraw,
    event_scale,
    sample_morphology,
    sample_patients,
)
from .render import SlideRenderer
from .spatial import measure
from .stain import sample_stain, stain_lut
from .tiff import write_slide_tiff
from .truth import SCHEMA, class_fractions, fractions_dict, region_table


@dataclass(frozen=True)
class CohortInfo:
    """What :func:`make_cohort` produced."""

    out_dir: Path
    n_patients: int
    slide_ids: tuple[str, ...]
    generic_slide_ids: tuple[str, ...]
    clinical_path: Path
    splits_dir: Path
    truth_path: Path
    oracle_c_index: float | None
    megapixels: float
    seconds: float

    @property
    def n_slides(self) -> int:
        return len(self.slide_ids)


@dataclass(frozen=True)
class _SlidePlan:
    slide_id: str
    patient: PatientDraw
    patient_id: str
    index: int  # slide number within the patient, from 1
    width: int
    height: int
    layout: str


def patient_id(index: int) -> str:
    """Patient id of patient ``index`` (0-based): ``SYN-0007`` for index 7."""
    return f"SYN-{index:04d}"


def slide_id(patient_index: int, slide_number: int) -> str:
    """Slide id: ``SYN-0007-01`` is the first slide of patient 7."""
    return f"{patient_id(patient_index)}-{slide_number:02d}"


def _round16(v: float) -> int:
    return max(LABEL_DS, int(round(v / LABEL_DS)) * LABEL_DS)


def plan_cohort(
    n_patients: int,
    seed: int,
    slide_px: int,
    censor_rate: float = 0.65,
    two_slide_fraction: float = 0.2,
    generic_fraction: float = 0.1,
) -> list[_SlidePlan]:
    """Decide every slide (id, size, layout) without rendering anything."""
    patients = sample_patients(n_patients, seed, censor_rate)
    plans: list[_SlidePlan] = []
    for p in patients:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, p.index]))
        n_slides = 2 if rng.random() < two_slide_fraction else 1
        for s in range(1, n_slides + 1):
            width = _round16(slide_px)
            height = _round16(width * rng.uniform(0.75, 1.25))
            plans.append(_SlidePlan(slide_id(p.index, s), p, patient_id(p.index), s, width, height, "aperio"))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    n_generic = max(1, int(round(generic_fraction * len(plans))))
    for i in rng.choice(len(plans), size=min(n_generic, len(plans)), replace=False):
        plans[i] = _SlidePlan(**{**plans[i].__dict__, "layout": "generic"})
    return plans


def make_cohort(
    out_dir: str | os.PathLike[str],
    n_patients: int = 8,
    seed: int = 0,
    slide_px: int = 4096,
    *,
    censor_rate: float = 0.65,
    two_slide_fraction: float = 0.2,
    generic_fraction: float = 0.1,
    n_folds: int = 5,
    texture_px: int = 2048,
    quality: int = 90,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortInfo:
    """Render a synthetic cohort into ``out_dir`` and return a summary.

    ``slide_px`` is the level-0 width of every slide (rounded to a multiple of 16 so
    label pixels tile the slide exactly); heights vary within +-25 %. The same
    arguments always give the same files, pixel for pixel.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    if n_patients < n_folds:
        raise InputError(f"n_patients ({n_patients}) must be >= n_folds ({n_folds}) to fill every fold")
    if slide_px < 512:
        raise InputError(f"slide_px must be >= 512, got {slide_px}")
    if not 0.0 <= two_slide_fraction <= 1.0 or not 0.0 <= generic_fraction <= 1.0:
        raise InputError("two_slide_fraction and generic_fraction must lie in [0, 1]")
    truth_path = out / "truth.json"
    if truth_path.exists():
        if not overwrite:
            raise InputError(
                f"{out} already holds a cohort ({truth_path}); pass overwrite=True (--overwrite) or pick another folder"
            )
        _remove_previous(out, truth_path)

    plans = plan_cohort(n_patients, seed, slide_px, censor_rate, two_slide_fraction, generic_fraction)
    total_px = sum(p.width * p.height for p in plans)
    slides_truth = []
    with _progress(progress) as bar:
        task = bar.add_task("rendering", total=total_px / 1e6) if bar else None
        for plan in plans:
            if bar is not None:
                bar.update(task, description=f"{plan.slide_id} ({plan.width}x{plan.height})")
            slides_truth.append(
                _render_slide(
                    out,
                    plan,
                    seed,
                    texture_px,
                    quality,
                    on_block=(lambda n: bar.advance(task, n / 1e6)) if bar is not None else None,
                )
            )

    patients = {p.patient.index: p.patient for p in plans}
    clinical = pd.DataFrame(
        {
            "pathology_id": [p.slide_id for p in plans],
            "patient_id": [p.patient_id for p in plans],
            "e": [p.patient.e for p in plans],
            "t": [p.patient.t for p in plans],
        }
    )
    clinical_path = out / "clinical.csv"
    write_text_atomic(clinical_path, clinical.to_csv(index=False, float_format="%.2f"))

    per_patient = pd.DataFrame({"patient_id": [patient_id(i) for i in patients], "e": [p.e for p in patients.values()]})
    splits_dir = out / "splits"
    write_splits(splits_dir, make_patient_splits(per_patient, k=n_folds, seed=seed))

    c_index = _oracle_c_index(list(patients.values()))
    truth = {
        "schema": SCHEMA,
        "generator": {
            "slidevl_version": __version__,
            "seed": seed,
            "n_patients": n_patients,
            "slide_px": slide_px,
            "censor_rate": censor_rate,
            "two_slide_fraction": two_slide_fraction,
            "generic_fraction": generic_fraction,
            "n_folds": n_folds,
            "texture_px": texture_px,
            "jpeg_quality": quality,
        },
        "classes": list(CLASSES),
        "class_index": CLASS_INDEX,
        "mpp": MPP,
        "label_downsample": LABEL_DS,
        "region_px": REGION_PX,
        "survival_model": {
            "risk": "sum of coefficient * (feature - population mean) / population sd",
            "risk_coefs": RISK_COEFS,
            "time": "Weibull proportional hazards: T = scale * (-log U)^(1/shape) * exp(-risk/shape), months",
            "weibull_shape": WEIBULL_SHAPE,
            "weibull_scale_months": round(event_scale(round(float(censor_rate), 6)), 4),
            "censoring": "log-normal, independent of risk, capped at max_follow_up_months",
            "censor_median_months": CENSOR_MEDIAN_MONTHS,
            "censor_log_sd": CENSOR_LOG_SD,
            "max_follow_up_months": MAX_FOLLOW_UP_MONTHS,
            "oracle_c_index": c_index,
        },
        "patients": [
            {
                "patient_id": patient_id(i),
                "morphology": p.morphology.as_dict(),
                "risk": p.risk,
                "t": p.t,
                "e": p.e,
                "slides": [s.slide_id for s in plans if s.patient.index == i],
            }
            for i, p in patients.items()
        ],
        "slides": slides_truth,
    }
    write_json_atomic(truth_path, truth)
    return CohortInfo(
        out_dir=out,
        n_patients=n_patients,
        slide_ids=tuple(p.slide_id for p in plans),
        generic_slide_ids=tuple(p.slide_id for p in plans if p.layout == "generic"),
        clinical_path=clinical_path,
        splits_dir=splits_dir,
        truth_path=truth_path,
        oracle_c_index=c_index,
        megapixels=total_px / 1e6,
        seconds=time.perf_counter() - t_start,
    )


def _render_slide(out: Path, plan: _SlidePlan, seed: int, texture_px: int, quality: int, on_block) -> dict:
    """Lay out, label and render one slide; return its truth entry."""
    m = plan.patient.morphology
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4, plan.patient.index, plan.index]))
    layout = make_layout(plan.width, plan.height, m, rng)
    labels = layout.label_map()
    label_path = out / "labels" / f"{plan.slide_id}.png"
    with atomic_path(label_path) as tmp:
        Image.fromarray(labels).save(tmp, format="PNG")

    stain = sample_stain(rng)
    renderer = SlideRenderer(layout, m.grade, stain_lut(stain), seed, rng, texture_px)
    tiff_path = out / "slides" / f"{plan.slide_id}.tiff"
    dims = write_slide_tiff(
        tiff_path, renderer.render, plan.width, plan.height, layout=plan.layout, quality=quality, on_block=on_block
    )
    whole = class_fractions(labels, [0, 0, plan.width, plan.height])
    tissue = whole[1:].sum()
    return {
        "slide_id": plan.slide_id,
        "patient_id": plan.patient_id,
        "path": f"slides/{plan.slide_id}.tiff",
        "label_path": f"labels/{plan.slide_id}.png",
        "width": plan.width,
        "height": plan.height,
        "mpp": MPP,
        "layout": plan.layout,
        "levels": [list(d) for d in dims],
        "grade": m.grade,
        "stain": stain.as_dict(),
        "nodules": [n.as_dict() for n in layout.nodules],
        "arrangement": layout.arrangement.as_dict(),
        "spatial": measure(labels, [0, 0, plan.width, plan.height], LABEL_DS, MPP).as_dict(),
        "composition": fractions_dict(whole),
        "tissue_composition": fractions_dict(whole / tissue if tissue > 0 else whole),
        "regions": region_table(labels),
    }


def _remove_previous(out: Path, truth_path: Path) -> None:
    # Only delete what the previous cohort's truth lists, never unknown files.
    try:
        old = json.loads(truth_path.read_text())
        for s in old.get("slides", []):
            for key in ("path", "label_path"):
                if key in s:
                    (out / s[key]).unlink(missing_ok=True)
    except (OSError, json.JSONDecodeError):
        pass
    truth_path.unlink(missing_ok=True)


def _oracle_c_index(patients: list[PatientDraw]) -> float | None:
    from sksurv.metrics import concordance_index_censored

    e = np.array([p.e for p in patients], bool)
    t = np.array([p.t for p in patients], float)
    r = np.array([p.risk for p in patients], float)
    if e.sum() == 0:
        return None
    try:
        return round(float(concordance_index_censored(e, t, r)[0]), 4)
    except ValueError:  # no comparable pairs
        return None


class _progress:
    """A rich progress bar in megapixels, or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None

    def __enter__(self) -> Progress | None:
        if not self.enabled:
            return None
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("Mpx"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.bar.__enter__()
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def render_slide(path: str | os.PathLike[str], size: int, seed: int = 0) -> Path:
    """One square synthetic H&E slide of ``size`` px at 0.5 µm/px (Aperio layout), rendered block by block.

    For benchmarks that need a slide of a given size without a cohort; an existing
    file is kept, so reruns reuse it.
    """
    path = Path(path)
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    morphology = sample_morphology(rng)
    layout = make_layout(size, size, morphology, rng)
    renderer = SlideRenderer(layout, morphology.grade, stain_lut(sample_stain(rng)), seed, rng)
    write_slide_tiff(path, renderer.render, size, size, layout="aperio")
    return path
