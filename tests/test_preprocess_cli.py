"""`slidevl preprocess` through the typer app: exit codes, options and printed locations."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from slide_fixtures import write_aperio_slide
from slidevl.features.cli import app
from slidevl.features.jobs import read_manifest
from slidevl.features.store import FeatureStore, read_slide_attrs

runner = CliRunner()
FAST = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_aperio_slide(root / "good.svs", 1536, 1536)
    write_aperio_slide(root / "nompp.svs", 1536, 1536, mpp=None, seed=2)
    return root


def test_failures_give_exit_code_1_and_overrides_fix_them(slides, tmp_path):
    job = tmp_path / "job"
    first = runner.invoke(app, ["preprocess", str(slides), "--out", str(job), *FAST])
    assert first.exit_code == 1
    assert "nompp" in first.output and "--mpp-override" in first.output
    assert "manifest:" in first.output and "summary:" in first.output and "features:" in first.output
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnompp,0.5\n")
    second = runner.invoke(app, ["preprocess", str(slides), "--out", str(job), "--mpp-csv", str(csv), *FAST])
    assert second.exit_code == 0, second.output
    assert "1 ok, 1 skipped" in second.output
    assert read_slide_attrs(FeatureStore(job).path("nompp"))["mpp_source"] == "csv"


def test_magnification_alias_grid_options_and_tissue_recipe(slides, tmp_path):
    # Tissue settings come from a recipe file; the tissue options typed on the command line win over it.
    recipe = tmp_path / "tissue.yaml"
    recipe.write_text("median_size: 5\nclosing_radius_um: 8\nadipose_radius_um: 10\n")
    job = tmp_path / "job"
    result = runner.invoke(app, ["preprocess", str(slides / "good.svs"), "--out", str(job), "--magnification", "10",
                                 "--patch-px", "128", "--no-pack-features", "--no-global-feature", "--recipe", str(recipe),
                                 "--adipose-radius-um", "40", "--adipose-um-per-px", "2", "--adipose-reach-um", "500", *FAST])
    assert result.exit_code == 0, result.output
    sf = FeatureStore(job).load("good")
    assert sf.attrs["target_mpp"] == 1.0 and sf.attrs["patch_size_level0"] == 256.0
    tissue = sf.attrs["config_fingerprint"]["tissue"]
    assert (tissue["adipose_radius_um"], tissue["adipose_um_per_px"], tissue["adipose_reach_um"]) == (40.0, 2.0, 500.0)
    assert (tissue["median_size"], tissue["closing_radius_um"]) == (5, 8.0)
    assert read_manifest(job)["config"]["tissue"] == tissue
    assert sf.pack_features is None and sf.global_feature is None and sf.pack_grid is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2"], "0 <= i < n"),
        (["--shard", "x"], "i/n"),
        (["--mpp", "0.5", "--magnification", "20"], "not both"),
        (["--encoder", "nonsense"], "nonsense"),
        (["--min-tissue", "1.5"], "min_tissue"),
        (["--mpp-csv", "/no/such.csv"], "not found"),
    ],
)
def test_usage_errors_exit_2(slides, tmp_path, args, message):
    result = runner.invoke(app, ["preprocess", str(slides), "--out", str(tmp_path), *args, *FAST])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")


def test_folder_without_slides_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no slides here")
    result = runner.invoke(app, ["preprocess", str(tmp_path / "empty"), "--out", str(tmp_path / "job"), *FAST])
    assert result.exit_code == 2 and "no slides found" in result.output
    assert not (tmp_path / "job").exists()


def test_progress_bars_run(slides, tmp_path):
    result = runner.invoke(app, ["preprocess", str(slides / "good.svs"), "--out", str(tmp_path), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "slides" in result.output and "patches" in result.output


def test_slurm_array_task_takes_its_shard_without_arguments(slides, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    result = runner.invoke(app, ["preprocess", str(slides), "--out", str(tmp_path), "--mpp-override", "0.5", *FAST])
    assert result.exit_code == 0, result.output
    assert "shard 1/2 of the batch (from SLURM_ARRAY_TASK_ID)" in result.output
    assert "(shard 1/2: 1 of 2)" in result.output
    assert FeatureStore(tmp_path).slide_ids() == ["nompp"]
