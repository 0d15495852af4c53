"""Patient-level cross-validation splits in the TCGA ``splits_{k}.csv`` format.

A split file has a leading unnamed index column and ``train``/``val`` columns of patient
ids; the shorter column is padded with empty cells::

    ,train,val
    0,TCGA-3C-AALI,TCGA-5T-A9QA
    ...
    763,TCGA-Z7-A8R6,

Splitting is by patient, never by slide, so all slides of one patient land in the same
fold, and stratified by the event indicator so every fold sees events.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .atomic import write_text_atomic

Split = tuple[list[str], list[str]]

_SPLIT_RE = re.compile(r"^splits_(\d+)\.csv$")


def make_patient_splits(patients: pd.DataFrame, k: int = 5, seed: int = 0) -> list[Split]:
    """Event-stratified ``k``-fold patient splits: a list of (train_ids, val_ids).

    ``patients`` needs ``patient_id`` and ``e`` columns; a slide-level table (several
    rows per patient) is reduced to one row per patient first. Ids come back sorted
    within each list, as in the TCGA files.
    """
    missing = {"patient_id", "e"} - set(patients.columns)
    if missing:
        raise ValueError(f"make_patient_splits: table lacks column(s) {sorted(missing)}; it needs patient_id and e")
    if k < 2:
        raise ValueError(f"make_patient_splits: k must be >= 2, got {k}")
    table = patients[["patient_id", "e"]].copy()
    table["patient_id"] = table["patient_id"].astype(str)
    table["e"] = table["e"].astype(float).astype(int)
    per_patient = table.groupby("patient_id", sort=True)["e"].agg(["min", "max"])
    conflicting = per_patient.index[per_patient["min"] != per_patient["max"]]
    if len(conflicting):
        raise ValueError(
            f"make_patient_splits: patient {conflicting[0]!r} has rows with different event values; "
            "fix the clinical table so every slide of a patient has the same e"
        )
    ids = per_patient.index.to_numpy()
    events = per_patient["min"].to_numpy()
    if len(ids) < k:
        raise ValueError(f"make_patient_splits: {len(ids)} patients cannot fill {k} folds; use k <= {len(ids)}")

    counts = np.bincount(events, minlength=2)
    if counts[counts > 0].min() >= k:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = [val for _, val in skf.split(ids, events)]
    else:
        # StratifiedKFold refuses (or warns) when a class has fewer members than folds,
        # which happens in tiny demo cohorts; deal each class round-robin instead.
        folds = _round_robin_folds(events, k, seed)
    out: list[Split] = []
    for val_idx in folds:
        val_mask = np.zeros(len(ids), bool)
        val_mask[val_idx] = True
        out.append((sorted(ids[~val_mask].tolist()), sorted(ids[val_mask].tolist())))
    return out


def _round_robin_folds(events: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(events), np.int64)
    start = 0
    for cls in np.unique(events):
        members = rng.permutation(np.flatnonzero(events == cls))
        assignment[members] = (start + np.arange(len(members))) % k
        start += len(members)  # the next class continues where this one stopped
    return [np.flatnonzero(assignment == f) for f in range(k)]


def write_splits(directory: str | os.PathLike[str], splits: list[Split]) -> list[Path]:
    """Write ``splits_{i}.csv`` files (TCGA format) atomically; return their paths."""
    directory = Path(directory)
    paths = []
    for i, (train, val) in enumerate(splits):
        _check_disjoint(train, val, f"fold {i}")
        frame = pd.DataFrame({"train": pd.Series(list(train), dtype=object), "val": pd.Series(list(val), dtype=object)})
        path = directory / f"splits_{i}.csv"
        write_text_atomic(path, frame.to_csv(index=True))
        paths.append(path)
    return paths


def read_splits(directory: str | os.PathLike[str], k: int | None = None) -> list[Split]:
    """Read ``splits_0.csv``, ``splits_1.csv``, ... from ``directory``.

    With ``k`` exactly folds 0..k-1 are required; otherwise every consecutive file from
    0 is read. Raises with the file name on a missing file or column, an empty
    validation fold, or a patient that is in both train and val.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"split folder {directory} does not exist")
    if k is None:
        found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SPLIT_RE.match(p.name)))
        if not found:
            raise FileNotFoundError(f"no splits_{{k}}.csv files in {directory}")
        k = 0
        while k in found:
            k += 1
    out: list[Split] = []
    for i in range(k):
        path = directory / f"splits_{i}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"missing split file {path}; expected splits_0.csv ... splits_{k - 1}.csv")
        frame = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
        missing = {"train", "val"} - set(frame.columns)
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {sorted(missing)}; a split file needs 'train' and 'val' columns "
                f"(found {list(frame.columns)})"
            )
        train = [s.strip() for s in frame["train"] if s.strip()]
        val = [s.strip() for s in frame["val"] if s.strip()]
        if not val:
            raise ValueError(f"{path}: the val column is empty")
        _check_disjoint(train, val, str(path))
        out.append((train, val))
    return out


def _check_disjoint(train: list[str], val: list[str], where: str) -> None:
    for name, ids in (("train", train), ("val", val)):
        seen: set[str] = set()
        for pid in ids:
            if pid in seen:
                raise ValueError(f"{where}: patient {pid!r} is listed twice in {name}")
            seen.add(pid)
    both = sorted(set(train) & set(val))
    if both:
        raise ValueError(
            f"{where}: patient {both[0]!r} is in both train and val"
            + (f" (and {len(both) - 1} more)" if len(both) > 1 else "")
            + "; splits must be patient-level and disjoint"
        )
