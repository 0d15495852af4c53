"""The clinical table: slide rows in, one validated row per patient out.

The default CSV contract is ``pathology_id, patient_id, e, t`` (``e`` = 1 for an
observed event, ``t`` in months), the layout of the public TCGA survival tables. Other
tables are read through :class:`ClinicalColumns`: their own column names, a censoring
indicator instead of an event indicator, and times in days, months or years (converted
to months, the unit of everything downstream). Slide ids are matched to feature files
with or without a slide-file extension (``TCGA-XX.svs`` finds ``TCGA-XX.h5``). Several
slides of one patient form one bag, so everything downstream works on the patient table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from slidevl.config import Config, setting
from slidevl.errors import InputError
from slidevl.slide.formats import SLIDE_EXTENSIONS

REQUIRED_COLUMNS = ("pathology_id", "patient_id", "e", "t")
# Months per unit; a year is 365.25 days, so a month is 30.4375 days.
TIME_UNITS = {"days": 12 / 365.25, "months": 1.0, "years": 12.0}
# No follow-up lasts a century: longer times mean the unit is wrong (days read as months).
MAX_PLAUSIBLE_MONTHS = 1200.0
# Extensions a table's slide ids may carry; the feature file is named by the slide's stem.
# A DICOM slide's id is its folder name, which carries none: it matches as it is.
ID_EXTENSIONS = (*SLIDE_EXTENSIONS, ".h5")


class CohortError(InputError):
    """The clinical table, the splits or the feature store do not fit together."""


class NoFeaturesError(CohortError):
    """No slide of the clinical table matches a feature file."""


@dataclass(frozen=True)
class ClinicalColumns(Config):
    """Where the table keeps each field, and in which unit (the CLI's ``--id-col`` … ``--time-unit``)."""

    id_col: str = setting("pathology_id", help="Column of slide ids: the slide file name, with or without extension.")
    patient_col: str = setting("patient_id", help="Column of patient ids (a patient's slides form one bag).")
    time_col: str = setting("t", help="Column of survival or follow-up times.")
    event_col: str = setting("e", help="Column of the event indicator: 1 = event (death), 0 = censored.")
    event_is_censoring: bool = setting(
        False, help="The event column holds a censoring indicator instead: 1 = censored, 0 = event.")
    time_unit: str = setting("months", help="Unit of the time column: days, months or years (converted to months).")

    def __post_init__(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise CohortError(f"--time-unit must be one of {', '.join(TIME_UNITS)}, got {self.time_unit!r}")

    @property
    def mapping(self) -> dict[str, str]:
        """Internal name → table column (one column may serve twice: slide and patient ids of one-slide patients)."""
        return {"pathology_id": self.id_col, "patient_id": self.patient_col, "e": self.event_col, "t": self.time_col}


def strip_slide_extension(slide_id: str) -> str:
    """``TCGA-XX.svs`` → ``TCGA-XX``; ids without a known slide extension are returned unchanged."""
    for ext in ID_EXTENSIONS:
        if slide_id.lower().endswith(ext) and len(slide_id) > len(ext):
            return slide_id[: -len(ext)]
    return slide_id


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


def read_clinical(path: str | Path, columns: ClinicalColumns | None = None) -> pd.DataFrame:
    """Read and check the slide-level clinical CSV; return it as ``pathology_id, patient_id, e, t`` (months).

    Raises one :class:`CohortError` naming the file, listing every problem found with the
    offending rows and the fix: missing columns (and the options that map them),
    non-numeric, negative, missing or implausibly long times, event values outside {0, 1},
    one slide listed under two patients, and patients whose rows disagree on the label.
    """
    path = Path(path)
    columns = columns or ClinicalColumns()
    tcol, ecol = columns.time_col, columns.event_col
    needed = list(dict.fromkeys(columns.mapping.values()))
    if not path.is_file():
        raise CohortError(f"{path}: clinical table not found; pass a CSV with columns {', '.join(needed)}")
    raw = pd.read_csv(path, dtype={columns.id_col: str, columns.patient_col: str})
    options = {"pathology_id": "--id-col", "patient_id": "--patient-col", "t": "--time-col", "e": "--event-col"}
    missing = {name: col for name, col in columns.mapping.items() if col not in raw.columns}
    if missing:
        raise CohortError(
            f"{path}: missing column(s) {list(dict.fromkeys(missing.values()))}; the clinical table needs {', '.join(needed)} "
            f"(found {list(raw.columns)}); name your own columns with {', '.join(options[name] for name in missing)}"
        )
    df = pd.DataFrame({name: raw[col] for name, col in columns.mapping.items()})
    if df.empty:
        raise CohortError(f"{path}: the clinical table has no rows")
    problems: list[str] = []
    for col, name in (("pathology_id", columns.id_col), ("patient_id", columns.patient_col)):
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            problems.append(f"empty {name} on CSV row(s) {_preview(df.index[blank] + 2)}; fill it in or drop the row")
        df[col] = df[col].astype(str).str.strip()

    t = pd.to_numeric(df["t"], errors="coerce")
    bad_t = t.isna() | ~np.isfinite(t)
    if bad_t.any():
        rows = df.loc[bad_t]
        problems.append(
            f"non-numeric or missing survival time {tcol} for {_preview(rows['pathology_id'] + '=' + rows['t'].astype(str))}; "
            f"{tcol} must be a number of {columns.time_unit}"
        )
    if (t < 0).any():
        rows = df.loc[t < 0]
        problems.append(
            f"negative survival time {tcol} for {_preview(rows['pathology_id'] + '=' + rows['t'].astype(str))}; "
            f"{tcol} is {columns.time_unit} from diagnosis and must be >= 0"
        )
    months = t * TIME_UNITS[columns.time_unit]
    if (months > MAX_PLAUSIBLE_MONTHS).any():
        longest = float(t.max())
        fits = [u for u, f in TIME_UNITS.items() if longest * f <= MAX_PLAUSIBLE_MONTHS]
        problems.append(
            f"survival times up to {longest:g} {columns.time_unit} ({longest * TIME_UNITS[columns.time_unit] / 12:.0f} years) "
            f"are not plausible follow-up; pass the unit of {tcol} with --time-unit ({' or '.join(fits) or 'days'})"
        )
    e = pd.to_numeric(df["e"], errors="coerce")
    bad_e = ~e.isin([0, 1])
    if bad_e.any():
        rows = df.loc[bad_e]
        meaning = "0 (event) or 1 (censored)" if columns.event_is_censoring else "0 (censored) or 1 (event)"
        problems.append(
            f"event indicator {ecol} must be {meaning}; got {_preview(rows['pathology_id'] + '=' + rows['e'].astype(str))}"
        )
    if problems:
        raise CohortError(join_problems(path, problems))
    df["t"] = months.astype(float)
    df["e"] = (1 - e if columns.event_is_censoring else e).astype(int)

    owners = df.groupby("pathology_id")["patient_id"].nunique()
    shared = owners[owners > 1]
    if len(shared):
        problems.append(f"slide(s) {_preview(shared.index)} listed under more than one patient; a slide belongs to one patient")
    disagree = df.groupby("patient_id")[["e", "t"]].nunique()
    disagree = disagree[(disagree["e"] > 1) | (disagree["t"] > 1)]
    if len(disagree):
        detail = [
            f"{pid}: " + ", ".join(f"(e={r.e}, t={r.t:g})" for r in df[df["patient_id"] == pid].drop_duplicates(["e", "t"]).itertuples())
            for pid in disagree.index[:5]
        ]
        problems.append(
            f"rows of the same patient disagree on e/t — {'; '.join(detail)}"
            f"{' …' if len(disagree) > 5 else ''}; every slide row of a patient must carry the same label"
        )
    if problems:
        raise CohortError(join_problems(path, problems))
    return df.drop_duplicates(["pathology_id"]).reset_index(drop=True)


def join_problems(source: Path | str, problems: list[str]) -> str:
    """One message for every problem found: inline for one, a list for several."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def patient_table(slides: pd.DataFrame) -> pd.DataFrame:
    """Collapse checked slide rows into one row per patient (first-appearance order)."""
    grouped = slides.groupby("patient_id", sort=False)
    patients = grouped.agg(e=("e", "first"), t=("t", "first"), slides=("pathology_id", list))
    patients.index.name = "patient_id"
    return patients


def missing_features_problem(skipped: list[str]) -> str:
    return (
        f"{len(skipped)} slide(s) in the clinical table have no features: {_preview(skipped, 10)}; "
        "run `slidevl preprocess` for them, or pass --skip-missing to leave them out"
    )


def load_cohort(
    path: str | Path,
    has_features: Callable[[str], bool] | None = None,
    *,
    skip_missing: bool = False,
    columns: ClinicalColumns | None = None,
) -> Cohort:
    """Load the clinical CSV as a :class:`Cohort`.

    ``has_features(slide_id)`` says whether a slide has a feature file. A table id is
    tried as it is, then without its slide extension; a match renames the slide to the
    feature file's id. Slides without a match are listed in the error; with
    ``skip_missing`` they are dropped instead (and patients left without any slide too),
    and recorded on the cohort.
    """
    path = Path(path)
    slides = read_clinical(path, columns)
    all_patients = list(dict.fromkeys(slides["patient_id"]))
    skipped: list[str] = []
    if has_features is not None:
        def resolve(slide_id: str) -> str | None:
            for candidate in dict.fromkeys((slide_id, strip_slide_extension(slide_id))):
                if has_features(candidate):
                    return candidate
            return None

        resolved = slides["pathology_id"].map(resolve)
        present = resolved.notna()
        skipped = slides.loc[~present, "pathology_id"].tolist()
        if skipped and not skip_missing:
            raise CohortError(f"{path}: {missing_features_problem(skipped)}")
        slides = slides[present].assign(pathology_id=resolved[present])
    if slides.empty:
        raise NoFeaturesError(f"{path}: no slide of the clinical table has features; check that --features points at the right job folder")
    patients = patient_table(slides)
    lost = [p for p in all_patients if p not in patients.index]
    return Cohort(patients=patients, source=path, skipped_slides=skipped, skipped_patients=lost)
