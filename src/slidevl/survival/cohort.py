"""The clinical table: slide rows in, one validated row per patient out.

The CSV contract is ``pathology_id, patient_id, e, t`` (``e`` = 1 for an observed
event, ``t`` in months), the layout of the public TCGA survival tables. Several slides
of one patient form one bag, so everything downstream works on the patient table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("pathology_id", "patient_id", "e", "t")


class CohortError(ValueError):
    """The clinical table, the splits or the feature store do not fit together."""


@dataclass
class Cohort:
    """Patients with their label and slides.

    ``patients`` is indexed by ``patient_id`` with columns ``e`` (int 0/1), ``t``
    (float months) and ``slides`` (list of slide ids, in CSV order).
    ``skipped_slides`` lists slides dropped because their features are missing.
    """

    patients: pd.DataFrame
    source: Path
    skipped_slides: list[str] = field(default_factory=list)
    skipped_patients: list[str] = field(default_factory=list)

    @property
    def patient_ids(self) -> list[str]:
        return list(self.patients.index)

    def __len__(self) -> int:
        return len(self.patients)

    def subset(self, patient_ids: Iterable[str]) -> pd.DataFrame:
        """Rows of the given patients, in the given order."""
        return self.patients.loc[list(patient_ids)]


def _preview(values: Iterable[object], limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def read_clinical(path: str | Path) -> pd.DataFrame:
    """Read and check the slide-level clinical CSV; return it with ``e`` int and ``t`` float.

    Raises :class:`CohortError` naming the file, the offending rows and the fix for:
    missing columns, non-numeric or negative or missing times, ``e`` outside {0, 1},
    one slide listed under two patients, and patients whose rows disagree on ``e``/``t``.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: clinical table not found; pass a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
    df = pd.read_csv(path, dtype={"pathology_id": str, "patient_id": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CohortError(
            f"{path}: missing column(s) {missing}; the clinical table needs {', '.join(REQUIRED_COLUMNS)} "
            f"(found {list(df.columns)})"
        )
    df = df[list(REQUIRED_COLUMNS)].copy()
    if df.empty:
        raise CohortError(f"{path}: the clinical table has no rows")
    for col in ("pathology_id", "patient_id"):
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            raise CohortError(f"{path}: empty {col} on CSV row(s) {_preview(df.index[blank] + 2)}; fill it in or drop the row")
        df[col] = df[col].astype(str).str.strip()

    t = pd.to_numeric(df["t"], errors="coerce")
    bad_t = t.isna() | ~np.isfinite(t)
    if bad_t.any():
        rows = df.loc[bad_t]
        raise CohortError(
            f"{path}: non-numeric or missing survival time t for {_preview(rows['pathology_id'] + '=' + rows['t'].astype(str))}; "
            "t must be a number of months"
        )
    if (t < 0).any():
        rows = df.loc[t < 0]
        raise CohortError(f"{path}: negative survival time t for {_preview(rows['pathology_id'] + '=' + rows['t'].astype(str))}; t is months from diagnosis and must be >= 0")
    e = pd.to_numeric(df["e"], errors="coerce")
    bad_e = ~e.isin([0, 1])
    if bad_e.any():
        rows = df.loc[bad_e]
        raise CohortError(
            f"{path}: event indicator e must be 0 (censored) or 1 (event); got {_preview(rows['pathology_id'] + '=' + rows['e'].astype(str))}"
        )
    df["t"] = t.astype(float)
    df["e"] = e.astype(int)

    owners = df.groupby("pathology_id")["patient_id"].nunique()
    shared = owners[owners > 1]
    if len(shared):
        raise CohortError(f"{path}: slide(s) {_preview(shared.index)} listed under more than one patient; a slide belongs to one patient")
    disagree = df.groupby("patient_id")[["e", "t"]].nunique()
    disagree = disagree[(disagree["e"] > 1) | (disagree["t"] > 1)]
    if len(disagree):
        detail = [
            f"{pid}: " + ", ".join(f"(e={r.e}, t={r.t:g})" for r in df[df["patient_id"] == pid].drop_duplicates(["e", "t"]).itertuples())
            for pid in disagree.index[:5]
        ]
        raise CohortError(
            f"{path}: rows of the same patient disagree on e/t — {'; '.join(detail)}"
            f"{' …' if len(disagree) > 5 else ''}; every slide row of a patient must carry the same label"
        )
    return df.drop_duplicates(["pathology_id"]).reset_index(drop=True)


def patient_table(slides: pd.DataFrame) -> pd.DataFrame:
    """Collapse checked slide rows into one row per patient (first-appearance order)."""
    grouped = slides.groupby("patient_id", sort=False)
    patients = grouped.agg(e=("e", "first"), t=("t", "first"), slides=("pathology_id", list))
    patients.index.name = "patient_id"
    return patients


def load_cohort(
    path: str | Path,
    has_features: Callable[[str], bool] | None = None,
    *,
    skip_missing: bool = False,
) -> Cohort:
    """Load the clinical CSV as a :class:`Cohort`.

    ``has_features(slide_id)`` says whether a slide has a feature file. Slides without
    one are listed in the error; with ``skip_missing`` they are dropped instead (and
    patients left without any slide too), and recorded on the cohort.
    """
    path = Path(path)
    slides = read_clinical(path)
    all_patients = list(dict.fromkeys(slides["patient_id"]))
    skipped: list[str] = []
    if has_features is not None:
        present = slides["pathology_id"].map(has_features).astype(bool)
        skipped = slides.loc[~present, "pathology_id"].tolist()
        if skipped and not skip_missing:
            raise CohortError(
                f"{path}: {len(skipped)} slide(s) in the clinical table have no features: {_preview(skipped, 10)}; "
                "run `slidevl preprocess` for them, or pass --skip-missing to leave them out"
            )
        slides = slides[present]
    if slides.empty:
        raise CohortError(f"{path}: no slide of the clinical table has features; check that --features points at the right job folder")
    patients = patient_table(slides)
    lost = [p for p in all_patients if p not in patients.index]
    return Cohort(patients=patients, source=path, skipped_slides=skipped, skipped_patients=lost)
