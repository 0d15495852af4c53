"""End-to-end cross-validation on a tiny planted-signal cohort, through the CLI, plus predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from slidevl.survival.cli import app
from slidevl.survival.cohort import CohortError
from slidevl.survival.cv import run_cv
from slidevl.survival.metrics import c_index, stratify
from slidevl.survival.report import print_cv_table
from slidevl.survival.toy import make_toy_cohort

FAST = ["--epochs", "8", "--grad-accum", "4", "--lr", "1e-3", "--k", "3", "--device", "cpu", "--quiet"]



@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return make_toy_cohort(tmp_path_factory.mktemp("toy"), n_patients=30, seed=0)


def test_hila_cv_learns_and_writes_the_run_folder(toy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(run),
                                      "--model", "hila", "--option", "dim=32", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    oracle = c_index(toy.truth["t"], toy.truth["e"], toy.truth["risk"])
    assert summary["c_index"]["mean"] > 0.65, summary["c_index"]
    assert summary["c_index"]["mean"] > oracle - 0.25
    assert len(summary["c_index"]["folds"]) == 3 and summary["bins"]["mode"] == "all"
    assert summary["config"]["variant"] == "full" and summary["features"]["region_tokens"] == "store"
    assert summary["features"]["hdf5_reads"] == summary["cohort"]["slides"], "every slide read once per run"
    oof = pd.read_csv(run / "oof_risks.csv")
    # The log-rank p is that of the median split of the pooled out-of-fold risks.
    assert summary["logrank_p"] == pytest.approx(stratify(oof["t"], oof["e"], oof["risk"]).p_value)
    assert list(oof.columns) == ["patient_id", "fold", "risk", "t", "e"]
    assert sorted(oof["patient_id"]) == sorted(toy.truth["patient_id"])
    assert (run / "km.png").stat().st_size > 1000
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("fold_")) == ["fold_0", "fold_1", "fold_2"]
    assert (run / "splits" / "splits_0.csv").is_file()

    evidence = json.loads(next((run / "evidence").glob("*.json")).read_text())
    n = len(evidence["patch"]["coords"])
    assert len(evidence["patch"]["kept"]) == len(evidence["patch"]["prompt_index"]) == len(evidence["patch"]["alignment"]) == n
    assert sum(evidence["patch"]["kept"]) >= 1
    texts = {p["index"]: p for p in evidence["prompts"]["patch"]}
    assert all(i in texts for i in evidence["patch"]["prompt_index"])
    assert "region" in evidence and evidence["model"] == "hila"

    # predict: one patient's feature files through a saved fold model
    h5 = sorted((toy.job / "features" / "toy").glob("TOY-0003-*.h5"))
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(run / "fold_0"), *map(str, h5)])
    assert result.exit_code == 0, result.output
    pred = json.loads(result.output)
    assert len(pred["survival"]) == 4 and np.all(np.diff(pred["survival"]) <= 0)
    assert pred["risk"] == pytest.approx(-sum(pred["survival"]))
    assert pred["bin_edges_months"] == summary["bins"]["edges"][0]
    assert pred["slides"] == [p.stem for p in h5]
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(run / "fold_0"), str(toy.clinical)])
    assert result.exit_code == 2 and "--job" in result.output


def test_abmil_cv_with_read_splits_train_bins_and_attention_evidence(toy, tmp_path: Path) -> None:
    first = run_cv(features=toy.job, clinical=toy.clinical, out=tmp_path / "a", model="meanpool", epochs=1, k=3,
                   device="cpu", show_progress=False, evidence=False)
    summary = run_cv(features=toy.job, clinical=toy.clinical, out=tmp_path / "b", model="abmil", epochs=6,
                     grad_accum=4, lr=1e-3, device="cpu", splits=tmp_path / "a" / "splits", bins_mode="train",
                     show_progress=False)
    assert summary["splits"]["source"] == str(tmp_path / "a" / "splits")
    assert summary["bins"]["mode"] == "train" and len({tuple(e) for e in summary["bins"]["edges"]}) == 3
    assert summary["c_index"]["mean"] > 0.6
    assert [f["n_val"] for f in summary["folds"]] == [f["n_val"] for f in first["folds"]]
    record = json.loads(next((tmp_path / "b" / "evidence").glob("*-S0.json")).read_text())
    assert record["model"] == "abmil" and len(record["patch"]["attention"]) == len(record["patch"]["coords"])
    assert not (tmp_path / "a" / "evidence").exists()
    console = Console(record=True, width=200)
    print_cv_table([first, summary], console=console)
    text = console.export_text()
    assert "meanpool" in text and "abmil" in text and f"{summary['c_index']['mean']:.3f}" in text


def test_missing_features_fail_or_are_skipped(toy, tmp_path: Path) -> None:
    clinical = tmp_path / "clinical.csv"
    table = pd.read_csv(toy.clinical)
    extra = pd.DataFrame([{"pathology_id": "GHOST-S0", "patient_id": "GHOST", "e": 1, "t": 3.0}])
    pd.concat([table, extra]).to_csv(clinical, index=False)
    args = ["cv", "--features", str(toy.job), "--clinical", str(clinical), "--model", "meanpool", "--epochs", "1", *FAST[4:]]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r1")])
    assert result.exit_code == 2 and "GHOST-S0" in result.output and "--skip-missing" in result.output
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r2"), "--skip-missing"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["cohort"]["skipped_slides"] == ["GHOST-S0"] and summary["cohort"]["skipped_patients"] == ["GHOST"]
    with pytest.raises(CohortError):
        run_cv(features=toy.job, clinical=clinical, out=tmp_path / "r3", model="meanpool", epochs=1, show_progress=False)


def test_bad_options_are_reported(toy, tmp_path: Path) -> None:
    base = ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(tmp_path / "x"), "--quiet"]
    for extra, message in ((["--model", "cox"], "--model must be one of"),
                           (["--model", "abmil", "--variant", "B"], "--variant applies to hila only"),
                           (["--bins-mode", "val"], "--bins-mode must be one of"),
                           (["--prompts", "nope"], "unknown prompt bank")):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_synthetic_slides_end_to_end_with_predict_from_a_slide(tmp_path: Path) -> None:
    """Rendered slides → preprocess → HiLa CV → predict straight from a slide file."""
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.synth.cohort import make_cohort

    info = make_cohort(tmp_path / "cohort", n_patients=6, seed=0, slide_px=4096, n_folds=2,
                       censor_rate=0.2, progress=False)
    report = preprocess(info.out_dir / "slides", tmp_path / "job", PreprocessConfig(progress=False))
    assert report.exit_code == 0
    summary = run_cv(features=tmp_path / "job", clinical=info.clinical_path, splits=info.splits_dir, out=tmp_path / "run",
                     model="hila", epochs=2, grad_accum=2, n_bins=2, device="cpu", show_progress=False)
    assert summary["features"]["region_tokens"] == "store" and len(summary["c_index"]["folds"]) == 2
    slide = info.out_dir / "slides" / f"{info.slide_ids[0]}.tiff"
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(tmp_path / "run" / "fold_0"), str(slide),
                                      "--job", str(tmp_path / "job2")])
    assert result.exit_code == 0, result.output
    pred = json.loads(result.stdout)
    assert pred["slides"] == [info.slide_ids[0]] and len(pred["survival"]) == 2


def test_each_fold_gets_its_own_seed() -> None:
    from slidevl.survival.cv import fold_seed

    seeds = [fold_seed(0, k) for k in range(5)]
    assert len(set(seeds)) == 5 and seeds == [fold_seed(0, k) for k in range(5)]
    assert fold_seed(1, 0) not in seeds


def test_a_recipe_sets_the_run_and_typed_options_win(toy, tmp_path: Path) -> None:
    recipe = tmp_path / "cv.yaml"
    recipe.write_text("model: meanpool\nepochs: 3\nk: 2\nmodel_options: {dropout: 0.1}\nevidence: false\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(run),
                                      "--recipe", str(recipe), "--epochs", "1", "--grad-accum", "auto", "--device", "cpu",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "summary.json").read_text())["config"]
    assert (config["model"], config["k"], config["epochs"], config["grad_accum"]) == ("meanpool", 2, 1, None)
    assert config["model_options"] == {"dropout": 0.1} and config["evidence"] is False
    assert not (run / "evidence").exists()
    bad = CliRunner().invoke(app, ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(run),
                                   "--grad-accum", "0"])
    assert bad.exit_code == 2 and "positive integer or auto" in bad.output


def test_compare_pairs_folds_and_refuses_other_splits(toy, tmp_path: Path) -> None:
    from slidevl.survival.compare import paired_comparison

    runs = {}
    for model, seed in (("abmil", 0), ("meanpool", 0), ("abmil", 1)):
        runs[model, seed] = tmp_path / f"{model}{seed}"
        args = ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(runs[model, seed]),
                "--model", model, *FAST, "--seed", str(seed)]
        assert CliRunner().invoke(app, args).exit_code == 0
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare", "--a", str(runs["abmil", 0]), "--b", str(runs["meanpool", 0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cmp = json.loads(out.read_text())
    a = json.loads((runs["abmil", 0] / "summary.json").read_text())["c_index"]["folds"]
    b = json.loads((runs["meanpool", 0] / "summary.json").read_text())["c_index"]["folds"]
    assert cmp["n_pairs"] == 3 and cmp["effect"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert cmp["ci95"][0] <= cmp["effect"] <= cmp["ci95"][1] and 0 < cmp["p"] <= 1
    assert "Wilcoxon p" in result.output
    # runs of other seeds share no (seed, fold); runs whose folds hold other patients do not pair
    bad = CliRunner().invoke(app, ["compare", "--a", str(runs["abmil", 1]), "--b", str(runs["meanpool", 0])])
    assert bad.exit_code == 2 and "no (seed, fold) is shared" in bad.output
    moved = tmp_path / "moved"
    shutil.copytree(runs["meanpool", 0], moved)
    oof = pd.read_csv(moved / "oof_risks.csv")
    oof["fold"] = (oof["fold"] + 1) % 3
    oof.to_csv(moved / "oof_risks.csv", index=False)
    bad = CliRunner().invoke(app, ["compare", "--a", str(runs["abmil", 0]), "--b", str(moved)])
    assert bad.exit_code == 2 and "scores other patients" in bad.output
    # a clear effect is detected, no effect is not
    strong = paired_comparison([0.7 + 0.01 * i for i in range(15)], [0.6 + 0.01 * i for i in range(15)])
    assert strong["effect"] == pytest.approx(0.1) and strong["p"] < 0.001 and strong["ci95"] == pytest.approx([0.1, 0.1])
    assert paired_comparison([0.7, 0.6, None], [0.7, 0.6, 0.5])["p"] == 1.0
