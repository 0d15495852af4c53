"""`survival cv` on small cohorts and one's own table: input checked first, defaults that fit,
undefined folds reported, run folders never mixed, and Ctrl-C then the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.splits import write_splits
from slidevl.survival.cli import app
from slidevl.survival.cohort import ClinicalColumns, CohortError, read_clinical
from slidevl.survival.cv import c_index_summary, run_cv
from slidevl.survival.metrics import has_comparable_pair
from slidevl.survival.report import print_cv_table
from slidevl.synth import make_cohort

QUICK = ["--model", "meanpool", "--epochs", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 8-patient synthetic cohort and its first 5 patients.

    Patient i of a synthetic cohort depends only on (seed, i), so the first five rows are
    what ``make_cohort(n_patients=5)`` writes: rendering the slides once serves both.
    """
    root = tmp_path_factory.mktemp("own")
    info = make_cohort(root / "cohort", n_patients=8, n_folds=5, seed=0, slide_px=2048, texture_px=512, progress=False)
    config = PreprocessConfig(workers=0, batch_size=64, progress=False, pack_features=False, global_feature=False)
    assert preprocess(info.out_dir / "slides", root / "job", config).exit_code == 0
    table = pd.read_csv(info.clinical_path, dtype={"pathology_id": str, "patient_id": str})
    five = table[table["patient_id"].isin([f"SYN-{i:04d}" for i in range(5)])]
    five.to_csv(root / "clinical5.csv", index=False)
    assert five["e"].groupby(five["patient_id"]).first().sum() == 2 and table.groupby("patient_id")["e"].first().sum() == 3
    return {"root": root, "job": root / "job", "c8": info.clinical_path, "c5": root / "clinical5.csv"}


def _cv(cohorts: dict[str, Path], clinical: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["cv", "--features", str(cohorts["job"]), "--clinical", str(clinical), "--out", str(out), *extra])


def test_small_cohorts_run_with_the_defaults(cohorts, tmp_path: Path) -> None:
    # The defaults but a quick model: 2 events → 2 folds, 2 bins, one patient per step.
    result = _cv(cohorts, cohorts["c5"], tmp_path / "five", *QUICK)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    for notice in ("--k 2 (not 5)", "--n-bins 2 (not 4)", "--grad-accum 1 (not 32)"):
        assert notice in result.output.replace("\n", " ")
    summary = json.loads((tmp_path / "five" / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["k"] == {"requested": None, "used": 2} and settings["n_bins"] == {"requested": None, "used": 2}
    grad = settings["grad_accum"]
    assert grad["requested"] is None and grad["used"] == 1 and grad["min_steps_per_epoch"] == 32
    assert "n_train // 32" in grad["rule"] and grad["steps_per_epoch"] == [f["n_train"] for f in summary["folds"]]
    assert summary["train"]["grad_accum"] == 1 and len(summary["notices"]) == 3
    assert summary["c_index"]["counted"] == 2

    result = _cv(cohorts, cohorts["c8"], tmp_path / "eight", *QUICK)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert summary["settings"]["k"]["used"] == 3 and summary["settings"]["n_bins"]["used"] == 3
    assert sorted(p.name for p in (tmp_path / "eight" / "splits").iterdir()) == [f"splits_{i}.csv" for i in range(3)]


def test_every_problem_is_reported_at_once_before_anything_is_written(cohorts, tmp_path: Path) -> None:
    clinical = tmp_path / "clinical.csv"
    table = pd.read_csv(cohorts["c8"])
    ghost = pd.DataFrame([{"pathology_id": "GHOST-01", "patient_id": "GHOST", "e": 0, "t": 5.0}])
    pd.concat([table, ghost]).to_csv(clinical, index=False)
    out = tmp_path / "run"
    result = _cv(cohorts, clinical, out, *QUICK, "--k", "5", "--n-bins", "4")
    text = result.output.replace("\n", " ")
    assert result.exit_code == 2 and "Traceback" not in text
    assert "3 problems" in text and "GHOST-01" in text and "--skip-missing" in text
    assert "--k 5: only 3 of the 8 patients have an event" in text and "use --k 2 to 3" in text
    assert "--n-bins 4 does not fit the cohort" in text and "--n-bins 3 or fewer fits" in text
    assert not out.exists(), "a refused run leaves no folder (no stray splits/)"

    result = CliRunner().invoke(app, ["bins", "--clinical", str(cohorts["c5"]), "--n-bins", "3"])
    assert result.exit_code == 2 and "--n-bins 2 or fewer fits" in result.output.replace("\n", " ")
    one_event = tmp_path / "one.csv"
    table.assign(e=(table["patient_id"] == "SYN-0000").astype(int)).to_csv(one_event, index=False)
    result = _cv(cohorts, one_event, out, *QUICK)
    assert result.exit_code == 2 and "cross-validation needs at least 2" in result.output.replace("\n", " ")
    assert not out.exists()


def test_a_fold_without_comparable_pair_is_undefined_not_a_traceback(cohorts, tmp_path: Path) -> None:
    # SYN-0001's event (31.8 months) comes after both censored times beside it: no pair to compare.
    splits = tmp_path / "splits"
    write_splits(splits, [(["SYN-0000", "SYN-0003"], ["SYN-0001", "SYN-0002", "SYN-0004"]),
                          (["SYN-0001", "SYN-0002", "SYN-0004"], ["SYN-0000", "SYN-0003"])])
    console = Console(record=True, width=300)
    summary = run_cv(features=cohorts["job"], clinical=cohorts["c5"], splits=splits, out=tmp_path / "run", model="meanpool",
                     epochs=1, device="cpu", show_progress=False, console=console)
    ci = summary["c_index"]
    assert ci["folds"][0] is None and ci["folds"][1] is not None
    assert ci["counted"] == 1 and ci["undefined_folds"] == [0] and ci["mean"] == ci["folds"][1] and ci["std"] == 0.0
    assert "fold 0: no comparable pair" in console.export_text()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["c_index"]["folds"][0] is None
    table = Console(record=True, width=300)
    print_cv_table(summary, console=table)
    text = table.export_text()
    assert "n/a" in text and "(1 of 2 folds)" in text

    assert not has_comparable_pair([31.8, 8.8, 7.2], [1, 0, 0]) and not has_comparable_pair([3.0, 3.0], [1, 1])
    assert has_comparable_pair([8.6, 41.8], [1, 0])
    assert c_index_summary([None, None])["mean"] is None


def test_own_table_columns_units_and_extensions(cohorts, tmp_path: Path) -> None:
    table = pd.read_csv(cohorts["c8"])
    own = pd.DataFrame({
        "slide": table["pathology_id"] + ".svs",  # ids as slide file names: matched to SYN-….h5
        "case": table["patient_id"],
        "OS.time": table["t"] * 365.25 / 12,  # days
        "censored": 1 - table["e"],
    })
    own.to_csv(tmp_path / "own.csv", index=False)
    mapping = ["--id-col", "slide", "--patient-col", "case", "--time-col", "OS.time", "--event-col", "censored",
               "--event-is-censoring", "--time-unit", "days"]
    mapped = CliRunner().invoke(app, ["bins", "--clinical", str(tmp_path / "own.csv"), *mapping])
    plain = CliRunner().invoke(app, ["bins", "--clinical", str(cohorts["c8"])])
    assert mapped.exit_code == 0 and plain.exit_code == 0, mapped.output
    a, b = json.loads(mapped.stdout), json.loads(plain.stdout)
    assert np.allclose(a["edges"], b["edges"]) and a["counts"] == b["counts"] and a["events"] == b["events"]

    result = _cv(cohorts, tmp_path / "own.csv", tmp_path / "run", *QUICK, *mapping)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cohort"]["slides"] == len(table) and summary["cohort"]["events"] == 3
    assert summary["config"]["columns"]["time_unit"] == "days"

    # Days read as months, and unmapped columns: each problem names the option that fixes it.
    with pytest.raises(CohortError, match=r"not plausible follow-up; pass the unit of OS.time with --time-unit \(days\)"):
        read_clinical(tmp_path / "own.csv", ClinicalColumns("slide", "case", "OS.time", "censored", True, "months"))
    result = _cv(cohorts, tmp_path / "own.csv", tmp_path / "run2", *QUICK)
    assert result.exit_code == 2 and "--id-col, --patient-col, --event-col, --time-col" in result.output.replace("\n", " ")
    result = _cv(cohorts, tmp_path / "own.csv", tmp_path / "run2", *QUICK, *mapping[2:], "--id-col", "case")
    assert result.exit_code == 2 and "pass the column with the slide file names as --id-col" in result.output.replace("\n", " ")


def test_run_folders_refuse_overwrite_cleanly_and_resume_only_the_same_run(cohorts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _cv(cohorts, cohorts["c8"], out, *QUICK, "--model", "abmil").exit_code == 0
    assert any((out / "evidence").iterdir())
    (out / "notes.txt").write_text("mine")

    again = _cv(cohorts, cohorts["c8"], out, *QUICK)
    assert again.exit_code == 2 and "holds a finished run; pass --overwrite" in again.output.replace("\n", " ")
    differs = _cv(cohorts, cohorts["c8"], out, *QUICK, "--resume")
    assert differs.exit_code == 2 and "model ('abmil' → 'meanpool')" in differs.output.replace("\n", " ")

    replaced = _cv(cohorts, cohorts["c8"], out, *QUICK, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "evidence").exists(), "nothing of the abmil run survives"
    assert (out / "notes.txt").read_text() == "mine", "the user's own file is kept"
    assert json.loads((out / "summary.json").read_text())["model"] == "meanpool"
    done = _cv(cohorts, cohorts["c8"], out, *QUICK, "--resume")
    assert done.exit_code == 0 and "nothing to do" in done.output

    other = tmp_path / "other"
    other.mkdir()
    (other / "slides.txt").write_text("x")
    refused = _cv(cohorts, cohorts["c8"], other, *QUICK)
    assert refused.exit_code == 2 and "holds other files" in refused.output.replace("\n", " ")
    assert sorted(p.name for p in other.iterdir()) == ["slides.txt"]


def test_sigint_stops_with_one_line_and_the_same_command_resumes(cohorts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    slidevl = Path(sys.executable).with_name("slidevl")
    command = [str(slidevl), "survival", "cv", "--features", str(cohorts["job"]), "--clinical", str(cohorts["c8"]),
               "--out", str(out), "--model", "meanpool", "--epochs", "15", "--quiet", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = out / "fold_0" / "result.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "of 3 folds finished" in lines[0] and "rerun the same command to resume" in lines[0]
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "interrupted" and 0 in state["finished"] and len(state["finished"]) < 3
    assert not (out / "summary.json").exists()
    kept = first.read_text()

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(state['finished'])} of 3 folds finished" in rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_folds"] == state["finished"] and len(summary["c_index"]["folds"]) == 3
    assert first.read_text() == kept, "a finished fold is not trained again"
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert len(pd.read_csv(out / "oof_risks.csv")) == 8
