"""`slidevl vqa predict`: a checkpoint answers a record file that `slidevl vqa eval` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.cli import app
from slidevl.slidellm.tuning.stages import run_stage
from slidevl.vqa.evaluate import evaluate
from slidevl.vqa.predictions import read_predictions
from slidevl.vqa.records import read_records
from test_slidellm_fixtures import stage_config, world  # noqa: F401  (fixture used by name)

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("predict") / "s2"
    run_stage(stage_config(world, "stage2", out))
    return out


def test_predict_answers_every_record_in_order(world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    pred = tmp_path / "pred.jsonl"
    result = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(checkpoint), "--records", str(world["records"]),
                                 "--out", str(pred), "--max-new-tokens", "4", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    gold = read_records(world["records"])
    answers = read_predictions(pred)
    assert list(answers) == [r.id for r in gold]
    assert all(isinstance(a, str) for a in answers.values())
    report = evaluate(pred, world["records"], out=tmp_path / "metrics.json")
    assert report["overall"]["n"] == len(gold)
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["n"] == len(gold)


def test_predict_bad_inputs_name_the_file(world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    pred = tmp_path / "pred.jsonl"
    missing = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(tmp_path / "nope"), "--records", str(world["records"]),
                                  "--out", str(pred)])
    assert missing.exit_code == 2 and "nope" in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    none = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(checkpoint), "--records", str(empty), "--out", str(pred)])
    assert none.exit_code == 2 and "no VQA records" in none.output
    assert not pred.exists()
