"""`slidevl demo` end to end on a tiny cohort: every step runs and every printed path exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.cli import app

runner = CliRunner()
TINY = ["--patients", "20", "--slide-px", "2048", "--epochs", "2"]


def _check_survival_and_features(out: Path, output: str) -> None:
    assert (out / "cohort" / "clinical.csv").is_file() and (out / "cohort" / "truth.json").is_file()
    assert len(list((out / "job" / "features" / "handcrafted").glob("*.h5"))) >= 20
    for model in ("abmil", "hila"):
        summary = json.loads((out / "runs" / model / "summary.json").read_text())
        assert len(summary["c_index"]["folds"]) == 5
        assert (out / "runs" / model / "km.png").is_file()
    assert f"slidevl serve {out / 'job'}" in output


def test_demo_without_vqa_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", *TINY])
    assert first.exit_code == 0, first.output
    _check_survival_and_features(out, first.output)
    assert not (out / "qa").exists()
    again = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", *TINY])
    assert again.exit_code == 0, again.output
    assert "reusing it" in again.output


def test_demo_refuses_too_few_patients(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--patients", "5"])
    assert result.exit_code == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_with_vqa(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    _check_survival_and_features(out, result.output)
    metrics = json.loads((out / "runs" / "vqa" / "metrics.json").read_text())
    test_records = (out / "qa" / "test.jsonl").read_text().splitlines()
    assert metrics["overall"]["n"] == len(test_records)
    assert f"--vqa-checkpoint {out / 'runs' / 'vqa' / 'stage2'}" in result.output
