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
from slidevl.survival.cohort import Cohort, CohortError, join_problems


@dataclass
class Fold:
    index: int
    train: list[str]
    val: list[str]


def _check(cohort: Cohort, raw: list[tuple[list[str], list[str]]], source: str) -> tuple[list[Fold], int]:
    """Folds restricted to the cohort's patients; every fold's problems are reported together."""
    known = set(cohort.patient_ids)
    skipped = set(cohort.skipped_patients)
    folds, dropped, problems = [], 0, []
    n_events = int(cohort.patients["e"].sum())
    for k, (train, val) in enumerate(raw):
        unknown = sorted((set(train) | set(val)) - known - skipped)
        if unknown:
            problems.append(
                f"fold {k}: {len(unknown)} patient(s) are not in the clinical table {cohort.source}: "
                f"{', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}; use the splits made for this table"
            )
            continue
        kept_train = [p for p in train if p in known]
        kept_val = [p for p in val if p in known]
        dropped += len(train) + len(val) - len(kept_train) - len(kept_val)
        if not kept_train or not kept_val:
            problems.append(f"fold {k}: the fold has an empty train or val side after dropping patients without features")
        elif not cohort.subset(kept_val)["e"].any():
            problems.append(
                f"fold {k}: no event among the {len(kept_val)} validation patients, so the C-index is undefined; "
                f"omit --splits to make event-stratified folds (--k at most {n_events}, the number of events)"
            )
        folds.append(Fold(k, kept_train, kept_val))
    if problems:
        raise CohortError(join_problems(source, problems))
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


def make_folds(cohort: Cohort, k: int, seed: int) -> tuple[list[Fold], dict]:
    """Make patient-level, event-stratified k-fold splits and check them.

    Nothing is written, so the input can be checked before a run folder exists;
    :func:`write_folds` writes them once the run starts.
    """
    table = cohort.patients.reset_index()[["patient_id", "e", "t"]]
    try:
        raw = make_patient_splits(table, k=k, seed=seed)
    except ValueError as exc:
        raise CohortError(str(exc)) from exc
    folds, _ = _check(cohort, raw, "generated splits")
    return folds, {"source": "generated", "k": k, "seed": seed}


def write_folds(folds: list[Fold], info: dict, out_dir: str | Path) -> dict:
    """Write generated folds as ``splits_{k}.csv`` to ``out_dir``; return ``info`` with where they went."""
    write_splits(out_dir, [(f.train, f.val) for f in folds])
    return {**info, "written_to": str(out_dir)}
