"""Patient-level split helpers: stratification, the TCGA file format, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidevl.splits import make_patient_splits, read_splits, write_splits

TCGA = Path(__file__).parents[2] / "shared" / "data" / "tcga"


def _patients(n: int, event_rate: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)], "e": (rng.random(n) < event_rate).astype(int)})


def _check_partition(splits, table: pd.DataFrame, k: int) -> None:
    ids = set(table["patient_id"])
    assert len(splits) == k
    seen_val: list[str] = []
    for train, val in splits:
        assert not set(train) & set(val)
        assert set(train) | set(val) == ids
        seen_val += val
    assert sorted(seen_val) == sorted(ids)  # every patient validated exactly once


@pytest.mark.parametrize("n,rate", [(100, 0.3), (6, 0.35), (23, 0.1)])
def test_splits_partition_patients_and_stratify_events(n: int, rate: float) -> None:
    table = _patients(n, rate)
    splits = make_patient_splits(table, k=5, seed=1)
    _check_partition(splits, table, 5)
    events = dict(zip(table["patient_id"], table["e"], strict=True))
    n_events = sum(events.values())
    per_fold = [sum(events[p] for p in val) for _, val in splits]
    # Stratified: events spread as evenly as the counts allow.
    assert max(per_fold) - min(per_fold) <= 1
    assert sum(per_fold) == n_events


def test_splits_are_deterministic_and_seed_dependent() -> None:
    table = _patients(60, 0.3)
    assert make_patient_splits(table, 5, seed=3) == make_patient_splits(table, 5, seed=3)
    assert make_patient_splits(table, 5, seed=3) != make_patient_splits(table, 5, seed=4)


def test_slide_level_table_keeps_patients_together() -> None:
    table = _patients(20, 0.4)
    slides = pd.concat([table, table.iloc[:5]])  # five patients with two slides
    splits = make_patient_splits(slides, k=4, seed=0)
    _check_partition(splits, table, 4)


def test_make_splits_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="lacks column"):
        make_patient_splits(pd.DataFrame({"patient_id": ["a"]}))
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        make_patient_splits(_patients(3, 0.5))
    bad = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "d", "e"], "e": [0, 1, 0, 0, 1, 0]})
    with pytest.raises(ValueError, match="'a' has rows with different event values"):
        make_patient_splits(bad, k=2)


def test_write_read_round_trip_in_tcga_format(tmp_path: Path) -> None:
    table = _patients(13, 0.3)
    splits = make_patient_splits(table, k=5, seed=0)
    write_splits(tmp_path, splits)
    assert read_splits(tmp_path) == splits
    text = (tmp_path / "splits_0.csv").read_text().splitlines()
    assert text[0] == ",train,val"
    assert text[1].startswith("0,")
    n_train, n_val = len(splits[0][0]), len(splits[0][1])
    assert len(text) == 1 + max(n_train, n_val)
    assert text[-1].endswith(",")  # the shorter val column is padded with empty cells


def test_read_splits_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_splits(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no splits_"):
        read_splits(tmp_path)
    write_splits(tmp_path, make_patient_splits(_patients(10, 0.3), k=2))
    with pytest.raises(FileNotFoundError, match="splits_2.csv"):
        read_splits(tmp_path, k=3)

    (tmp_path / "splits_0.csv").write_text(",train,validation\n0,a,b\n")
    with pytest.raises(ValueError, match=r"splits_0\.csv: missing column\(s\) \['val'\]"):
        read_splits(tmp_path)

    (tmp_path / "splits_0.csv").write_text(",train,val\n0,a,b\n1,b,\n")
    with pytest.raises(ValueError, match=r"splits_0\.csv: patient 'b' is in both train and val"):
        read_splits(tmp_path)

    (tmp_path / "splits_0.csv").write_text(",train,val\n0,a,\n")
    with pytest.raises(ValueError, match="val column is empty"):
        read_splits(tmp_path)


def test_write_splits_refuses_overlap(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'x' is in both train and val"):
        write_splits(tmp_path, [(["x", "y"], ["x"])])


@pytest.mark.skipif(not TCGA.is_dir(), reason=f"shared TCGA split tables not found at {TCGA}")
@pytest.mark.parametrize("cohort", ["brca", "luad", "ucec"])
def test_read_splits_on_tcga_tables(cohort: str) -> None:
    folder = TCGA / cohort
    splits = read_splits(folder)
    assert len(splits) == 5
    survival = pd.read_csv(next(folder.glob("mahmoodlab_*_survival.csv")))
    patients = set(survival["patient_id"])
    all_val: list[str] = []
    for train, val in splits:
        assert not set(train) & set(val)
        assert set(train) | set(val) <= patients
        all_val += val
    assert len(all_val) == len(set(all_val))  # each patient validated once
    if cohort == "brca":
        assert (len(splits[0][0]), len(splits[0][1])) == (764, 192)
