"""Survival bins: the MCAT/Patch-GCN rule on the shared TCGA tables, train-fold mode, the bins CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from slidevl.survival.cli import app
from slidevl.survival.cohort import CohortError, load_cohort
from slidevl.survival.labels import bin_summary, fit_bins

SHARED = Path(__file__).resolve().parents[2] / "shared"
TCGA = SHARED / "data" / "tcga"
COHORTS = ("brca", "luad", "ucec")


def _table(name: str) -> Path:
    path = TCGA / name / f"mahmoodlab_tcga_{name}_survival.csv"
    if not path.is_file():
        pytest.skip(f"shared TCGA table {path} not present")
    return path


def _reference_bins(csv: Path, n_bins: int = 4) -> tuple[np.ndarray, pd.Series]:
    """The rule written out directly with pandas, as in the MCAT/Patch-GCN data loaders."""
    slides = pd.read_csv(csv)
    patients = slides.drop_duplicates(["patient_id"]).copy()
    uncensored = patients[patients["e"] == 1]
    _, edges = pd.qcut(uncensored["t"], q=n_bins, retbins=True, labels=False)
    edges[-1] = slides["t"].max() + 1e-6
    edges[0] = slides["t"].min() - 1e-6
    labels = pd.cut(patients["t"], bins=edges, labels=False, right=False, include_lowest=True)
    return edges, labels.set_axis(patients["patient_id"]).astype(int)


@pytest.mark.parametrize("name", COHORTS)
def test_bins_match_mcat_rule_on_tcga(name: str) -> None:
    csv = _table(name)
    ref_edges, ref_labels = _reference_bins(csv)
    patients = load_cohort(csv).patients
    bins = fit_bins(patients["t"].to_numpy(), patients["e"].to_numpy(), 4)
    np.testing.assert_allclose(bins.edges, ref_edges, rtol=0, atol=1e-9)
    labels = pd.Series(bins.assign(patients["t"].to_numpy()), index=patients.index)
    pd.testing.assert_series_equal(labels.loc[ref_labels.index], ref_labels, check_names=False, check_dtype=False)
    # Quartiles of uncensored patients: each bin holds about a quarter of the events.
    events = np.bincount(labels[patients["e"] == 1], minlength=4)
    assert events.min() >= events.sum() // 4 - 2


def test_bins_cli_prints_edges_and_counts() -> None:
    csv = _table("luad")
    result = CliRunner().invoke(app, ["bins", "--clinical", str(csv), "--n-bins", "4"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    ref_edges, ref_labels = _reference_bins(csv)
    np.testing.assert_allclose(out["edges"], ref_edges, atol=1e-9)
    assert out["counts"] == np.bincount(ref_labels, minlength=4).tolist()
    assert out["n_patients"] == len(ref_labels) and out["mode"] == "all"
    assert [a + b for a, b in zip(out["events"], out["censored"])] == out["counts"]


def test_train_mode_fits_on_training_patients_and_clips_others() -> None:
    rng = np.random.default_rng(3)
    t = rng.uniform(1, 100, 200)
    e = rng.random(200) < 0.6
    train = np.arange(200) < 150
    bins = fit_bins(t[train], e[train], 4, mode="train")
    assert bins.mode == "train"
    np.testing.assert_allclose(bins.edges[1:-1], np.quantile(t[train][e[train]], [0.25, 0.5, 0.75]))
    assert bins.edges[0] == pytest.approx(t[train].min() - 1e-6) and bins.edges[-1] == pytest.approx(t[train].max() + 1e-6)
    # Validation times outside the training range land in the end bins rather than nowhere.
    assert bins.assign(np.array([-5.0, 1e6])).tolist() == [0, 3]
    summary = bin_summary(bins, t, e)
    assert sum(summary["counts"]) == 200 and summary["mode"] == "train"


def test_bins_refuse_too_few_distinct_event_times() -> None:
    t = np.array([5.0, 5.0, 5.0, 5.0, 9.0, 12.0])
    e = np.array([1, 1, 1, 1, 0, 0])
    with pytest.raises(CohortError, match="not distinct"):
        fit_bins(t, e, 4)
    with pytest.raises(CohortError, match="uncensored"):
        fit_bins(t, np.zeros(6), 4)
