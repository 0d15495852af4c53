"""Cross-validation folds: read TCGA-style ``splits_{k}.csv`` or make event-stratified ones.

Reading and writing the split files, and refusing a patient on both sides of a fold,
is :mod:`slidevl.splits`'s job; this module checks that the folds fit the cohort: no
unknown patient, and at least one event in every validation fold (the C-index is
undefined without one). Patients left out by ``--skip-missing`` are dropped from the
folds and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slidevl.splits import make_patient_splits, read_splits, write_splits
from slidevl.survival.cohort import Cohort, CohortError


@dataclass
class Fold:
    index: int
    train: list[str]
    val: list[str]


def _check(cohort: Cohort, raw: list[tuple[list[str], list[str]]], source: str) -> tuple[list[Fold], int]:
    known = set(cohort.patient_ids)
    skipped = set(cohort.skipped_patients)
    folds, dropped = [], 0
    for k, (train, val) in enumerate(raw):
        where = f"{source} (fold {k})"
        unknown = sorted((set(train) | set(val)) - known - skipped)
        if unknown:
            raise CohortError(
                f"{where}: {len(unknown)} patient(s) are not in the clinical table {cohort.source}: "
                f"{', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}; use the splits made for this table"
            )
        kept_train = [p for p in train if p in known]
        kept_val = [p for p in val if p in known]
        dropped += len(train) + len(val) - len(kept_train) - len(kept_val)
        if not kept_train or not kept_val:
            raise CohortError(f"{where}: the fold has an empty train or val side after dropping patients without features")
        if not cohort.subset(kept_val)["e"].any():
            raise CohortError(f"{where}: no event among the {len(kept_val)} validation patients, so the C-index is undefined; use fewer folds")
        folds.append(Fold(k, kept_train, kept_val))
    return folds, dropped


def load_folds(cohort: Cohort, splits_dir: str | Path) -> tuple[list[Fold], dict]:
    """Read every ``splits_{k}.csv`` of ``splits_dir`` and check it against the cohort."""
    splits_dir = Path(splits_dir)
    try:
        raw = read_splits(splits_dir)
    except FileNotFoundError as exc:
        raise CohortError(f"{exc}; omit --splits to make event-stratified folds") from exc
    except ValueError as exc:
        raise CohortError(str(exc)) from exc
    folds, dropped = _check(cohort, raw, str(splits_dir))
    return folds, {"source": str(splits_dir), "k": len(folds), "dropped_patients_without_features": dropped}


def make_folds(cohort: Cohort, k: int, seed: int, out_dir: str | Path) -> tuple[list[Fold], dict]:
    """Make patient-level, event-stratified k-fold splits, write them to ``out_dir`` and check them."""
    table = cohort.patients.reset_index()[["patient_id", "e", "t"]]
    try:
        raw = make_patient_splits(table, k=k, seed=seed)
    except ValueError as exc:
        raise CohortError(str(exc)) from exc
    write_splits(out_dir, raw)
    folds, _ = _check(cohort, raw, f"generated splits in {out_dir}")
    return folds, {"source": "generated", "written_to": str(out_dir), "k": k, "seed": seed}
