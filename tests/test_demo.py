"""`slidevl demo` end to end on a tiny cohort: every step runs and every printed path exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slidevl.cli import app
from slidevl.features.encoders.clip_train import ClipTrainConfig, build_model, save_model
from slidevl.features.encoders.text import get_text_encoder
from slidevl.qa.records import read_records

runner = CliRunner()
TINY = ["--patients", "20", "--slide-px", "2048", "--epochs", "2", "--threads", "1"]


def _check_survival_and_features(out: Path, output: str) -> None:
    assert (out / "cohort" / "clinical.csv").is_file() and (out / "cohort" / "truth.json").is_file()
    assert len(list((out / "job" / "features" / "handcrafted").glob("*.h5"))) >= 20
    for model in ("abmil", "hila"):
        summary = json.loads((out / "runs" / model / "summary.json").read_text())
        assert len(summary["c_index"]["folds"]) == 5
        assert (out / "runs" / model / "km.png").is_file()
    assert f"slidevl serve {out / 'job'}" in output
    # The results table, printed and in summary.json, holds the runs' own numbers and the planted risk's.
    summary = json.loads((out / "summary.json").read_text())
    for model in ("abmil", "hila"):
        run = json.loads((out / "runs" / model / "summary.json").read_text())["c_index"]
        assert summary["survival"][model] == {"c_index_mean": run["mean"], "c_index_std": run["std"], "folds": run["folds"]}
    oracle = json.loads((out / "cohort" / "truth.json").read_text())["survival_model"]["oracle_c_index"]
    assert summary["survival"]["oracle_c_index"] == oracle
    assert f"{oracle:.3f}" in output and "Demo results" in output and "planted risk" in output
    times = summary["time"]
    assert times["cpu_s"] > 0 and times["wall_s"] >= sum(t["wall_s"] for t in times["steps"].values()) - 0.5
    assert list(times["steps"])[:2] == ["synthetic cohort", "preprocess"]


def test_demo_without_vqa_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", *TINY])
    assert first.exit_code == 0, first.output
    _check_survival_and_features(out, first.output)
    assert not (out / "qa").exists()
    assert json.loads((out / "summary.json").read_text())["vqa"] is None
    again = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", *TINY])
    assert again.exit_code == 0, again.output
    assert "reusing it" in again.output


def test_demo_on_an_aligned_encoder(tmp_path: Path) -> None:
    """With a CLIP's features, HiLa's prompts come from its text tower and the zero-shot C-index is reported."""
    clip = tmp_path / "clip"
    # An untrained tiny CLIP is enough here: the path is what is tested, not what the model learnt.
    config = ClipTrainConfig(image_size=32, patch_size=16, vision_width=64, vision_layers=1, text_width=64,
                             text_layers=1, context_length=16, embed_dim=16)
    torch.manual_seed(0)
    save_model(build_model(config), clip, config)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", "--encoder", f"openclip:{clip}", *TINY])
    assert result.exit_code == 0, result.output
    # --no-vqa needs no hand-crafted job: only the CLIP's features are made.
    assert not (out / "job").exists()
    assert len(list((out / "job-aligned" / "features").glob("*/*.h5"))) >= 20
    hila = json.loads((out / "runs" / "hila" / "summary.json").read_text())
    space = get_text_encoder(f"openclip:{clip.resolve()}").space
    assert hila["text_space"] == space and hila["prompts"]["text_encoder"] == f"openclip:{clip.resolve()}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["encoder"] == f"openclip:{clip.resolve()}"
    assert summary["survival"]["hila_text_space"] == space
    zero_shot = summary["survival"]["zero_shot"]
    assert zero_shot["text_space"] == space and zero_shot["n_patients"] == 20
    assert zero_shot["c_index"] is not None and 0.0 <= zero_shot["c_index"] <= 1.0
    assert f"{zero_shot['c_index']:.3f}" in result.output and "zero-shot prompts" in result.output
    assert list(summary["time"]["steps"]) == ["synthetic cohort", "preprocess", "survival cv: abmil",
                                              "survival cv: hila", "zero-shot prognosis"]


def test_demo_train_clip_learns_from_a_cohort_of_its_own(tmp_path: Path) -> None:
    """--train-clip's captions name the grade the planted risk depends on: no survival patient may train it."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--no-vqa", "--train-clip", "--clip-epochs", "1",
                                 *TINY[:-4], "--epochs", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    own = out / "clip_data" / "cohort"
    assert (own / "clinical.csv").read_text() != (out / "cohort" / "clinical.csv").read_text()
    report = json.loads((out / "clip" / "report.json").read_text())
    seen = set(report["train_patients"]) | set(report["heldout_patients"])
    assert seen == {p["patient_id"] for p in json.loads((own / "truth.json").read_text())["patients"]}
    assert "held-out patients of its own cohort" in result.output
    assert not (out / "job").exists()  # --no-vqa with an aligned encoder: no hand-crafted job on the demo cohort
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["encoder"] == f"openclip:{out / 'clip'}"
    assert list(summary["time"]["steps"])[:4] == ["synthetic cohort", "CLIP's cohort", "preprocess: CLIP's cohort",
                                                  "train CLIP"]


def test_demo_train_clip_excludes_encoder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--train-clip", "--encoder", "conch:/x"])
    assert result.exit_code == 2 and "--train-clip" in result.output
    assert not (tmp_path / "d").exists()


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
    _check_vqa(out, result.output)


def _check_vqa(out: Path, output: str) -> None:
    metrics = json.loads((out / "runs" / "vqa" / "metrics.json").read_text())
    test_records = (out / "qa" / "test.jsonl").read_text().splitlines()
    assert metrics["overall"]["n"] == len(test_records)
    assert f"--vqa-checkpoint {out / 'runs' / 'vqa' / 'stage2'}" in output
    # The VQA rows: the evaluation's single-choice number beside its controls, on the same questions.
    vqa = json.loads((out / "summary.json").read_text())["vqa"]
    singles = [r for r in read_records(out / "qa" / "test.jsonl") if r.format == "single"]
    assert vqa["n_single"] == len(singles) > 0
    assert vqa["model"] == metrics["by_format"]["single"]["accuracy"]
    other = json.loads((out / "runs" / "vqa" / "metrics_other_slide.json").read_text())
    assert other["overall"]["n"] == len(singles) and vqa["other_slide"] == other["by_format"]["single"]["accuracy"]
    assert vqa["chance"] == pytest.approx(sum(1 / len(r.options) for r in singles) / len(singles), abs=1e-4)
    assert all(0.0 <= vqa[k] <= 1.0 for k in ("model", "other_slide", "majority", "chance"))
    # The spatial questions and the others, apart: together they are the single-choice set.
    kinds = vqa["by_kind"]
    spatial = [r for r in singles if r.category == "spatial"]
    assert kinds.get("spatial", {"n": 0})["n"] == len(spatial) and kinds["not spatial"]["n"] == len(singles) - len(spatial)
    for key in ("model", "other_slide", "chance"):
        assert sum(p[key] * p["n"] for p in kinds.values()) / len(singles) == pytest.approx(vqa[key], abs=1e-3)
    assert "not spatial (" in output
    assert "another slide's image" in output and "most common train answer" in output
    # The ask example is a held-out whole-slide single-choice question, shown with its options and truth.
    ask = vqa["ask"]
    record = next(r for r in singles if r.slide == ask["slide"] and r.question == ask["question"])
    assert record.level == "WSI" and ask["truth"] == record.answer and ask["options"] == list(record.options)
    assert ask["correct"] == (ask["chosen"] == record.answer)
    assert f"slidevl ask {ask['slide']}" in output and all(o in output for o in record.options)
