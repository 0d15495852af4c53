"""Clinical-table loading and fold checks: every bad input gets its own clear error."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from slidevl.splits import write_splits
from slidevl.survival.cohort import CohortError, load_cohort, read_clinical
from slidevl.survival.folds import load_folds, make_folds, write_folds

GOOD = """pathology_id,patient_id,e,t
S1,P1,1,10.5
S2,P1,1.0,10.5
S3,P2,0,30
S4,P3,1,4
S5,P4,0,55
S6,P5,1,20
"""


def _csv(tmp_path: Path, text: str, name: str = "clinical.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_table_groups_slides_by_patient(tmp_path: Path) -> None:
    cohort = load_cohort(_csv(tmp_path, GOOD))
    assert cohort.patient_ids == ["P1", "P2", "P3", "P4", "P5"]
    assert cohort.patients.loc["P1", "slides"] == ["S1", "S2"]
    assert cohort.patients["e"].tolist() == [1, 0, 1, 0, 1]
    assert cohort.patients.loc["P2", "t"] == 30.0


@pytest.mark.parametrize(
    "text, match",
    [
        ("pathology_id,patient_id,t\nS1,P1,3\n", r"missing column\(s\) \['e'\]"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,ten\n", r"non-numeric or missing survival time t for S1=ten"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,\n", r"non-numeric or missing survival time"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,-2\n", r"negative survival time t for S1=-2"),
        ("pathology_id,patient_id,e,t\nS1,P1,2,3\n", r"e must be 0 \(censored\) or 1 \(event\); got S1=2"),
        ("pathology_id,patient_id,e,t\nS1,P1,yes,3\n", r"e must be 0 \(censored\) or 1"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,3\nS2,P1,0,3\n", r"rows of the same patient disagree on e/t — P1: \(e=1, t=3\), \(e=0, t=3\)"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,3\nS2,P1,1,4\n", r"disagree on e/t"),
        ("pathology_id,patient_id,e,t\nS1,P1,1,3\nS1,P2,1,3\n", r"slide\(s\) S1 listed under more than one patient"),
    ],
)
def test_bad_tables_name_the_file_and_the_problem(tmp_path: Path, text: str, match: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(CohortError, match=match) as info:
        read_clinical(path)
    assert str(path) in str(info.value)


def test_missing_table_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="clinical table not found"):
        read_clinical(tmp_path / "nope.csv")


def test_slides_without_features_are_listed_or_skipped(tmp_path: Path) -> None:
    path = _csv(tmp_path, GOOD)
    present = {"S1", "S3", "S4", "S5", "S6"}  # S2 (second slide of P1) has no features
    with pytest.raises(CohortError, match=r"1 slide\(s\) in the clinical table have no features: S2;.*--skip-missing"):
        load_cohort(path, present.__contains__)
    cohort = load_cohort(path, present.__contains__, skip_missing=True)
    assert cohort.skipped_slides == ["S2"] and cohort.skipped_patients == []
    assert cohort.patients.loc["P1", "slides"] == ["S1"]
    # A patient whose only slide is missing leaves the cohort and is recorded.
    cohort = load_cohort(path, (present - {"S3"}).__contains__, skip_missing=True)
    assert "P2" not in cohort.patient_ids and cohort.skipped_patients == ["P2"]


def test_patient_in_both_train_and_val_is_refused(tmp_path: Path) -> None:
    cohort = load_cohort(_csv(tmp_path, GOOD))
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    pd.DataFrame({"train": ["P1", "P2", "P3"], "val": ["P3", "P4", "P5"]}).to_csv(split_dir / "splits_0.csv")
    with pytest.raises(CohortError, match=r"splits_0.csv: patient 'P3' is in both train and val"):
        load_folds(cohort, split_dir)


def test_split_with_unknown_patient_or_eventless_val_is_refused(tmp_path: Path) -> None:
    cohort = load_cohort(_csv(tmp_path, GOOD))
    unknown = tmp_path / "unknown"
    write_splits(unknown, [(["P1", "P2", "PX"], ["P3", "P4", "P5"])])
    with pytest.raises(CohortError, match=r"not in the clinical table .*PX"):
        load_folds(cohort, unknown)
    eventless = tmp_path / "eventless"
    write_splits(eventless, [(["P1", "P3", "P5"], ["P2", "P4"])])
    with pytest.raises(CohortError, match="no event among the 2 validation patients"):
        load_folds(cohort, eventless)
    with pytest.raises(CohortError, match="no splits_"):
        load_folds(cohort, tmp_path)


def test_skipped_patients_are_dropped_from_read_splits(tmp_path: Path) -> None:
    path = _csv(tmp_path, GOOD)
    cohort = load_cohort(path, lambda s: s != "S5", skip_missing=True)  # P4 has no features
    split_dir = tmp_path / "splits"
    write_splits(split_dir, [(["P1", "P2", "P4"], ["P3", "P5"]), (["P3", "P5"], ["P1", "P2", "P4"])])
    folds, info = load_folds(cohort, split_dir)
    assert folds[0].train == ["P1", "P2"] and folds[1].val == ["P1", "P2"]
    assert info["dropped_patients_without_features"] == 2


def test_made_folds_are_patient_level_partitions(tmp_path: Path) -> None:
    rows = "\n".join(f"S{i},P{i},{int(i % 3 == 0)},{i + 1}" for i in range(30))
    cohort = load_cohort(_csv(tmp_path, "pathology_id,patient_id,e,t\n" + rows + "\n"))
    folds, info = make_folds(cohort, 5, 0)
    assert not (tmp_path / "made").exists(), "making folds writes nothing"
    info = write_folds(folds, info, tmp_path / "made")
    assert info["source"] == "generated" and info["written_to"] == str(tmp_path / "made") and len(folds) == 5
    vals = [p for f in folds for p in f.val]
    assert sorted(vals) == sorted(cohort.patient_ids)
    assert sorted((tmp_path / "made").glob("splits_*.csv"))
    again, _ = load_folds(cohort, tmp_path / "made")
    assert [f.val for f in again] == [f.val for f in folds]
