"""Check a survival run's whole input before any work starts, and fit the defaults to small cohorts.

Every problem found (the table, ids against feature files, folds against events,
bins against uncensored patients, units) is reported in one
:class:`~slidevl.survival.cohort.CohortError` that names the option to change and the
values that would work. Nothing is written here: a refused run leaves no folder behind.

Options left unset (``None``: ``--k``, ``--n-bins``, ``--grad-accum auto``) are chosen
from the cohort, each change from the usual default printed as a notice and recorded
in the run's ``summary.json`` under ``settings``:

* folds: ``k = min(5, events)``, then fewer while some validation fold would have no
  comparable pair. Folds are stratified by event, so ``k <= events`` puts an event in
  every validation fold.
* bins: the largest ``n_bins <= 4`` whose MCAT edges are distinct on every set they
  are fitted on (the whole cohort for ``--bins-mode all``, each training fold for ``train``).
* gradient accumulation: ``grad_accum = min(32, max(1, n_train // MIN_STEPS_PER_EPOCH))``
  with ``n_train`` the smallest training fold, i.e. at least 32 optimizer steps per epoch;
  the paper's 32 patients per step is kept from 1024 training patients up. Evidence
  (``benchmarks/results/survival_synthetic.md`` and ``survival_diagnose.md``):
  with 9 steps per epoch (288 training patients, accumulation 32) models were still far
  from fitting their training patients after 20 epochs, with 36 steps (accumulation 8)
  they fit; on a 60-patient cohort HiLa scored 0.590 with accumulation 32 (2 steps per
  epoch) against 0.710 with accumulation 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidevl.features.store import FeatureStore, FeatureStoreError
from slidevl.survival.cohort import (
    ClinicalColumns,
    Cohort,
    CohortError,
    NoFeaturesError,
    join_problems,
    load_cohort,
    missing_features_problem,
    read_clinical,
)
from slidevl.survival.folds import Fold, load_folds, make_folds
from slidevl.survival.labels import SurvivalBins, fit_bins
from slidevl.survival.metrics import has_comparable_pair

DEFAULT_K = 5
DEFAULT_N_BINS = 4
DEFAULT_GRAD_ACCUM = 32  # the paper's patients per optimizer step
MIN_STEPS_PER_EPOCH = 32
GRAD_ACCUM_RULE = f"min({DEFAULT_GRAD_ACCUM}, max(1, n_train // {MIN_STEPS_PER_EPOCH})), n_train = smallest training fold"


def auto_grad_accum(n_train: int) -> int:
    """Patients per optimizer step that keep at least :data:`MIN_STEPS_PER_EPOCH` steps per epoch."""
    return min(DEFAULT_GRAD_ACCUM, max(1, n_train // MIN_STEPS_PER_EPOCH))


@dataclass
class CVPlan:
    """What a checked cross-validation run will do: cohort, folds and the values in effect."""

    store: FeatureStore
    cohort: Cohort
    folds: list[Fold]
    split_info: dict[str, Any]
    n_bins: int
    grad_accum: int
    global_bins: SurvivalBins | None
    undefined_folds: list[int]
    settings: dict[str, Any]
    notices: list[str] = field(default_factory=list)


def _bin_sets(cohort: Cohort, folds: list[Fold] | None, mode: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(t, e, where) of every set the bins are fitted on."""
    if mode == "all":
        return [(cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy(), "the cohort")]
    rows = [(cohort.subset(f.train), f"training fold {f.index}") for f in folds or []]
    return [(r["t"].to_numpy(), r["e"].to_numpy(), where) for r, where in rows]


def _bins_error(sets: list[tuple[np.ndarray, np.ndarray, str]], n_bins: int) -> tuple[str, str] | None:
    """(where, why) of the first set on which ``n_bins`` bins cannot be fitted."""
    for t, e, where in sets:
        try:
            fit_bins(t, e, n_bins)
        except CohortError as exc:
            return where, str(exc)
    return None


def _choose_bins(
    sets: list[tuple[np.ndarray, np.ndarray, str]], requested: int | None, problems: list[str], notices: list[str]
) -> int:
    """The number of bins in effect; a requested one that does not fit is a problem naming the values that do."""
    fitting = [n for n in range(max(requested or 0, DEFAULT_N_BINS), 0, -1) if _bins_error(sets, n) is None]
    if requested is not None:
        error = _bins_error(sets, requested)
        if error is not None:
            fix = f"--n-bins {fitting[0]} or fewer fits" if fitting else "no number of bins fits"
            problems.append(f"--n-bins {requested} does not fit {error[0]} ({error[1]}); {fix}")
        return requested
    if not fitting:
        where, why = _bins_error(sets, 1) or ("", "")
        problems.append(f"no survival bins can be fitted on {where}: {why}")
        return DEFAULT_N_BINS
    n_bins = min(fitting[0], DEFAULT_N_BINS)
    if n_bins < DEFAULT_N_BINS:
        fewest = min(sets, key=lambda s: int(np.asarray(s[1]).astype(bool).sum()))
        notices.append(f"--n-bins {n_bins} (not {DEFAULT_N_BINS}): {int(np.asarray(fewest[1]).astype(bool).sum())} uncensored "
                       f"patient(s) in {fewest[2]} allow {n_bins} distinct bin edges at most")
    return n_bins


def _undefined(cohort: Cohort, folds: list[Fold]) -> list[int]:
    """Folds whose validation patients have no comparable pair: their C-index is undefined."""
    out = []
    for fold in folds:
        val = cohort.subset(fold.val)
        if not has_comparable_pair(val["t"].to_numpy(), val["e"].to_numpy()):
            out.append(fold.index)
    return out


def _auto_folds(cohort: Cohort, n_events: int, seed: int) -> tuple[list[Fold], dict]:
    """The most folds (<= 5 and <= events) whose every validation fold has a comparable pair."""
    largest = min(DEFAULT_K, n_events)
    for k in range(largest, 1, -1):
        folds, info = make_folds(cohort, k, seed)
        if not _undefined(cohort, folds):
            return folds, info
    return make_folds(cohort, largest, seed)


def _id_hint(store: FeatureStore, clinical: Path, columns: ClinicalColumns) -> str:
    """Side by side, what the table's ids and the feature files look like."""
    files = [f"{s}.h5" for s in store.slide_ids()[:2]]
    if not files:
        return f"; {store.root} holds no feature file: run `slidevl preprocess SLIDES --out {store.job_dir}`"
    ids = read_clinical(clinical, columns)["pathology_id"].head(2).tolist()
    return (f" (the table's {columns.id_col} holds e.g. {ids}, {store.root} holds e.g. {files}; "
            "pass the column with the slide file names as --id-col)")


def _cohort(config: Any, problems: list[str], notices: list[str]) -> tuple[FeatureStore | None, Cohort]:
    """The store and the cohort of slides with features; raises :class:`CohortError` when nothing can be checked further."""
    store = None
    try:
        store = FeatureStore(config.features, config.encoder)
    except FeatureStoreError as exc:
        problems.append(str(exc))
    try:
        cohort = load_cohort(config.clinical, None if store is None else store.__contains__, skip_missing=True,
                             columns=config.columns)
    except NoFeaturesError as exc:
        raise CohortError(join_problems("survival cv", [*problems, str(exc) + _id_hint(store, config.clinical, config.columns)])) from None
    except CohortError as exc:
        raise CohortError(join_problems("survival cv", [*problems, str(exc)])) from None
    if cohort.skipped_slides:
        if config.skip_missing:
            notices.append(f"--skip-missing: {len(cohort.skipped_slides)} slide(s) without features left out "
                           f"({len(cohort.skipped_patients)} patient(s) lost entirely)")
        else:
            problems.append(f"{config.clinical}: {missing_features_problem(cohort.skipped_slides)}")
    return store, cohort


def plan_cv(config: Any) -> CVPlan:
    """Check a :class:`~slidevl.survival.cv.CVConfig`'s input and settle the values in effect.

    Raises :class:`CohortError` listing every problem; returns the plan otherwise.
    Reads the clinical table and the feature folder's file list, writes nothing.
    """
    problems: list[str] = []
    notices: list[str] = []
    store, cohort = _cohort(config, problems, notices)
    n_patients, n_events = len(cohort), int(cohort.patients["e"].sum())
    counts = f"{n_events} of the {n_patients} patients have an event"

    folds: list[Fold] | None = None
    split_info: dict[str, Any] = {}
    if config.splits is not None:
        try:
            folds, split_info = load_folds(cohort, config.splits)
        except CohortError as exc:
            problems.append(str(exc))
    elif n_events < 2:
        problems.append(f"{config.clinical}: only {counts}; cross-validation needs at least 2 "
                        "(every validation fold needs one for its C-index)")
    elif config.k is None:
        folds, split_info = _auto_folds(cohort, n_events, config.seed)
        if len(folds) < DEFAULT_K:
            notices.append(f"--k {len(folds)} (not {DEFAULT_K}): {counts}, and every validation fold needs an event "
                           "and a comparable pair; pass --k to choose")
    elif config.k > n_events:
        problems.append(f"--k {config.k}: only {counts}, so some validation fold would have none and no C-index; "
                        f"use --k {n_events if n_events == 2 else f'2 to {n_events}'} (at most the number of events)")
    else:
        try:
            folds, split_info = make_folds(cohort, config.k, config.seed)
        except CohortError as exc:
            problems.append(str(exc))

    n_bins = DEFAULT_N_BINS if config.n_bins is None else config.n_bins
    if folds is not None or config.bins_mode == "all":
        n_bins = _choose_bins(_bin_sets(cohort, folds, config.bins_mode), config.n_bins, problems, notices)

    grad_accum = DEFAULT_GRAD_ACCUM if config.grad_accum is None else config.grad_accum
    undefined: list[int] = []
    n_train = 0
    if folds is not None:
        n_train = min(len(f.train) for f in folds)
        auto = auto_grad_accum(n_train)
        if config.grad_accum is None:
            grad_accum = auto
            if auto < DEFAULT_GRAD_ACCUM:
                notices.append(f"--grad-accum {auto} (not {DEFAULT_GRAD_ACCUM}): {math.ceil(n_train / auto)} optimizer steps "
                               f"per epoch on {n_train} training patients (rule: {GRAD_ACCUM_RULE})")
        elif math.ceil(n_train / grad_accum) < MIN_STEPS_PER_EPOCH and grad_accum > auto:
            notices.append(f"--grad-accum {grad_accum} leaves {math.ceil(n_train / grad_accum)} optimizer step(s) per epoch "
                           f"on {n_train} training patients; --grad-accum auto would use {auto}")
        undefined = _undefined(cohort, folds)
        for index in undefined:
            notices.append(f"fold {index}: no comparable pair among its validation patients (no event before another "
                           "patient's time), so its C-index is undefined and left out of the mean")

    if problems:
        raise CohortError(join_problems("survival cv", problems))
    assert store is not None and folds is not None  # a missing store or folds is a problem above
    global_bins = None
    if config.bins_mode == "all":
        global_bins = fit_bins(cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy(), n_bins, mode="all")
    settings = {
        "k": {"requested": config.k, "used": len(folds)},
        "n_bins": {"requested": config.n_bins, "used": n_bins},
        "grad_accum": {"requested": config.grad_accum, "used": grad_accum, "rule": GRAD_ACCUM_RULE,
                       "min_steps_per_epoch": MIN_STEPS_PER_EPOCH, "smallest_training_fold": n_train,
                       "steps_per_epoch": [math.ceil(len(f.train) / grad_accum) for f in folds]},
    }
    return CVPlan(store, cohort, folds, split_info, n_bins, grad_accum, global_bins, undefined, settings, notices)


def plan_bins(clinical: str | Path, columns: ClinicalColumns | None, n_bins: int | None) -> tuple[Cohort, SurvivalBins, list[str]]:
    """The cohort and its MCAT bins for ``survival bins``; ``n_bins=None`` picks the most that fit (<= 4)."""
    try:
        cohort = load_cohort(clinical, columns=columns)
    except CohortError as exc:
        raise CohortError(str(exc)) from None
    problems: list[str] = []
    notices: list[str] = []
    n_bins = _choose_bins(_bin_sets(cohort, None, "all"), n_bins, problems, notices)
    if problems:
        raise CohortError(join_problems(str(clinical), problems))
    bins = fit_bins(cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy(), n_bins, mode="all")
    return cohort, bins, notices
