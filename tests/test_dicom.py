"""DICOM WSI input: a folder of one series is one slide, read through OpenSlide 4.

The series are written by wsidicom from a synthetic Aperio slide (``dicom_fixtures``).
Uncompressed, the DICOM slide and the TIFF it came from hold the same pixels and must give
the same features, coordinates and mpp; JPEG-compressed (the form TCGA is served in), the
features stay within a stated tolerance. The input folder also holds files and a folder
that are not slides, which must be listed on screen and in the job summary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_fixtures import JPEG, write_dicom_slide
from fastapi.testclient import TestClient
from PIL import Image
from slide_fixtures import write_aperio_slide
from test_slidellm_fixtures import make_encoder_dir, stage_config, tiny_train, world  # noqa: F401  (world: a fixture)
from typer.testing import CliRunner

from slidevl.features import jobcheck, jobs
from slidevl.features.cli import app
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore
from slidevl.qa.records import VQARecord, write_records
from slidevl.serve.app import create_app
from slidevl.serve.job import ServeJob
from slidevl.slide.reader import SlideOpenError, open_slide
from slidevl.slidellm.ask import SlideAssistant
from slidevl.slidellm.tuning.stages import run_stage

runner = CliRunner()
QUIET = PreprocessConfig(workers=0, progress=False)
NOT_SLIDES = ("notes.txt", "photo.jpg", "scans", "table.csv")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An input folder (a TIFF slide, its uncompressed and JPEG DICOM copies, four entries that are not slides)
    preprocessed by the CLI, tiles read by two worker processes that each open the DICOM folders."""
    root = tmp_path_factory.mktemp("dicom")
    inputs = root / "input"
    inputs.mkdir()
    tiff = write_aperio_slide(inputs / "S1.svs", 2048, 1536)
    dicom = inputs / "S1-dicom"
    files = write_dicom_slide(tiff, dicom)
    write_dicom_slide(tiff, inputs / "S1-jpeg", JPEG)
    (inputs / "notes.txt").write_text("scanned on Monday\n")
    (inputs / "table.csv").write_text("slide,grade\nS1,2\n")
    Image.new("RGB", (32, 32), (200, 100, 150)).save(inputs / "photo.jpg")
    (inputs / "scans").mkdir()
    (inputs / "scans" / "readme.txt").write_text("nothing to see\n")
    job = root / "job"
    result = runner.invoke(app, ["preprocess", str(inputs), "--out", str(job), "--workers", "2", "--no-progress"])
    return {"root": root, "inputs": inputs, "tiff": tiff, "dicom": dicom, "files": files, "job": job, "result": result}


def _status(job: Path, slide_id: str) -> dict:
    return json.loads((job / "status" / "handcrafted" / f"{slide_id}.json").read_text())


def test_the_series_opens_from_its_folder_or_any_of_its_files(cohort: dict) -> None:
    dicom, files = cohort["dicom"], cohort["files"]
    assert len(files) == 3  # one instance per pyramid level
    with open_slide(cohort["tiff"]) as tiff, open_slide(dicom) as slide:
        assert (slide.backend, slide.vendor, slide.path) == ("openslide", "dicom", dicom)
        assert slide.level_dimensions == tiff.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert slide.level_downsamples == tiff.level_downsamples
        assert slide.native_mpp() == (0.5, 0.5, "openslide.mpp-x")
        assert slide.describe()["file_bytes"] == sum(f.stat().st_size for f in files)
        for level, size in enumerate(slide.level_dimensions):
            np.testing.assert_array_equal(slide.read_region((0, 0), level, size), tiff.read_region((0, 0), level, size))
    for file in files:
        with open_slide(file) as slide:
            assert slide.path == dicom and slide.dimensions == (2048, 1536)


def test_preprocess_reads_the_dicom_folder_as_the_tiff_it_came_from(cohort: dict) -> None:
    assert cohort["result"].exit_code == 0, cohort["result"].output
    job, dicom = cohort["job"], cohort["dicom"]
    store = FeatureStore(job)
    tiff, dcm = store.load("S1"), store.load("S1-dicom")
    assert dcm.n_patches > 0
    # Uncompressed DICOM holds the TIFF's decoded pixels, so everything matches exactly.
    for name in ("patch_features", "patch_coords", "patch_grid", "patch_tissue", "region_features", "region_coords",
                 "pack_features", "pack_coords", "global_feature"):
        np.testing.assert_array_equal(getattr(dcm, name), getattr(tiff, name), err_msg=name)
    assert (dcm.attrs["mpp"], dcm.attrs["mpp_source"], dcm.attrs["mpp_read_property"]) == (0.5, "property", "openslide.mpp-x")
    assert (dcm.attrs["slide_vendor"], dcm.attrs["slide_path"]) == ("dicom", str(dicom.resolve()))
    assert dcm.attrs["level_dimensions"] == tiff.attrs["level_dimensions"]
    status = _status(job, "S1-dicom")
    assert status["status"] == "ok" and status["slide_path"] == str(dicom.resolve())
    assert status["slide_relpath"] == "../input/S1-dicom"
    assert status["slide_bytes"] == sum(f.stat().st_size for f in cohort["files"])


def test_a_jpeg_dicom_series_gives_the_tiff_features_within_tolerance(cohort: dict) -> None:
    # JPEG-baseline (re-compressing the TIFF's JPEG tiles): measured mean |difference| 1.7 grey
    # levels at level 0, 99th percentile 10; the bounds below leave room for the codec.
    with open_slide(cohort["tiff"]) as tiff_slide, open_slide(cohort["root"] / "input" / "S1-jpeg") as jpeg_slide:
        for level, size in enumerate(tiff_slide.level_dimensions):
            diff = np.abs(tiff_slide.read_region((0, 0), level, size).astype(np.int16)
                          - jpeg_slide.read_region((0, 0), level, size).astype(np.int16))
            assert diff.mean() < 3 and np.percentile(diff, 99) <= 16, (level, diff.mean())
    store = FeatureStore(cohort["job"])
    tiff, jpeg = store.load("S1"), store.load("S1-jpeg")
    assert (jpeg.attrs["mpp"], jpeg.attrs["slide_vendor"], jpeg.attrs["grid_shape"]) == (0.5, "dicom", tiff.attrs["grid_shape"])
    rows_t = {tuple(c): i for i, c in enumerate(tiff.patch_coords.tolist())}
    rows_j = {tuple(c): i for i, c in enumerate(jpeg.patch_coords.tolist())}
    shared = sorted(rows_t.keys() & rows_j.keys())
    # The noise moves tissue fractions, so patches near --min-tissue may be kept by one and not the other.
    assert len(shared) >= 2 * max(len(rows_t), len(rows_j)) / 3, (len(shared), len(rows_t), len(rows_j))
    a = tiff.patch_features[[rows_t[c] for c in shared]].astype(np.float64)
    b = jpeg.patch_features[[rows_j[c] for c in shared]].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.95, cosine.min()  # measured: 0.987


def test_entries_that_are_not_slides_are_listed_on_screen_and_in_the_summary(cohort: dict) -> None:
    inputs, job = cohort["inputs"], cohort["job"]
    screen = "".join(cohort["result"].output.splitlines())
    assert "preprocess: 3 slide(s)" in screen
    assert "skipped 3 file(s) and 1 folder(s) that are not slides: notes.txt, photo.jpg, scans/, table.csv" in screen
    listed = [str((inputs / name).resolve()) + ("/" if name == "scans" else "") for name in NOT_SLIDES]
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["not_slides"] == listed
    assert {e["slide_id"]: e["status"] for e in manifest["slides"]} == {"S1": "ok", "S1-dicom": "ok", "S1-jpeg": "ok"}
    summary = (job / "summary.md").read_text()
    assert "## Not slides (4)" in summary and all(f"- `{path}`" in summary for path in listed)


def test_dicom_files_given_by_name_stand_for_their_folder(cohort: dict) -> None:
    dicom, files = cohort["dicom"], cohort["files"]
    assert jobs.find_inputs(files[:2]) == ([dicom], [])
    assert jobs.find_inputs(dicom) == ([dicom], [])
    assert jobs.slide_id_of(files[0]) == jobs.slide_id_of(dicom) == "S1-dicom"


def test_folder_rules_that_would_be_ambiguous_are_usage_errors(cohort: dict, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(cohort["files"][0], mixed / "level0.dcm")
    (mixed / "other.svs").write_bytes(b"")
    with pytest.raises(jobs.UsageError, match=r"mixed: holds DICOM \(\.dcm\) files.*other slides \(other\.svs\).*folder of its own"):
        jobs.find_inputs(mixed)
    twins = tmp_path / "twins"
    shutil.copytree(cohort["dicom"], twins / "S1")
    shutil.copy(cohort["tiff"], twins / "S1.svs")
    with pytest.raises(jobs.UsageError, match="two slides share the id 'S1'.*folder names for DICOM slides"):
        jobs.find_inputs(twins)


def test_a_folder_of_two_series_is_refused_by_name(cohort: dict, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    shutil.copytree(cohort["dicom"], folder)
    for file in write_dicom_slide(cohort["tiff"], tmp_path / "second", JPEG):  # a second series, of another slide
        shutil.move(file, folder / file.name)
    with pytest.raises(SlideOpenError, match=rf"{folder}: holds 2 DICOM series \(series .*3 file\(s\).*own"):
        open_slide(folder)
    report = preprocess(folder, tmp_path / "job", QUIET)
    assert report.exit_code == 1
    status = _status(tmp_path / "job", "two")
    assert status["status"] == "failed" and "holds 2 DICOM series" in status["error"]


def test_folders_that_are_not_a_readable_series_are_refused_by_name(cohort: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_text("not DICOM\n")
    with pytest.raises(SlideOpenError, match=rf"{junk}: OpenSlide reads none of its 1 \.dcm file\(s\).*x\.dcm"):
        open_slide(junk)
    cut = tmp_path / "cut"
    shutil.copytree(cohort["dicom"], cut)
    (cut / "part.dcm").write_bytes(b"")  # a copy that did not finish
    with pytest.raises(SlideOpenError, match=r"cannot read 1 of its 4 \.dcm file\(s\).*part\.dcm.*copy a file cut short again"):
        open_slide(cut)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideOpenError, match=r"empty: a folder without DICOM \(\.dcm\) files"):
        open_slide(tmp_path / "empty")


def test_job_check_and_relocate_follow_a_moved_dicom_folder(cohort: dict, tmp_path: Path) -> None:
    job, moved = tmp_path / "job", tmp_path / "moved"
    shutil.copytree(cohort["job"], job)
    shutil.copytree(cohort["dicom"], moved / "S1-dicom")
    shutil.copy(cohort["tiff"], moved / "S1.svs")
    before = json.loads((job / "manifest.json").read_text())["not_slides"]
    plan = jobcheck.plan_relocation(job, moved)
    assert {r.slide_id: r.problem for r in plan} == {"S1": None, "S1-dicom": None, "S1-jpeg": f"not found in {moved.resolve()}"}
    plan = [r for r in plan if r.problem is None]  # relocate the two slides that moved
    jobcheck.relocate_job(job, plan)
    assert _status(job, "S1-dicom")["slide_path"] == str((moved / "S1-dicom").resolve())
    assert jobcheck.check_job(job).ok
    assert json.loads((job / "manifest.json").read_text())["not_slides"] == before  # kept by the rebuild
    # One instance grows: the folder is no longer the slide that was processed.
    level0 = moved / "S1-dicom" / cohort["files"][0].name
    level0.write_bytes(level0.read_bytes() + b"\0\0")
    checks = {c.slide_id: c for c in jobcheck.check_job(job).slides}
    assert checks["S1"].ok and "not the file that was preprocessed" in checks["S1-dicom"].slide_problem
    shutil.rmtree(moved / "S1-dicom")
    checks = {c.slide_id: c for c in jobcheck.check_job(job).slides}
    assert "file not found" in checks["S1-dicom"].slide_problem
    assert {r.slide_id: r.problem for r in jobcheck.plan_relocation(job, moved)}["S1-dicom"] == f"not found in {moved.resolve()}"


def test_the_viewer_serves_the_dicom_slide_as_its_tiff(cohort: dict) -> None:
    with TestClient(create_app(ServeJob(cohort["job"])), raise_server_exceptions=False) as client:
        assert {s["id"] for s in client.get("/api/slides").json()} == {"S1", "S1-dicom", "S1-jpeg"}
        info = client.get("/api/slides/S1-dicom").json()
        assert (info["width"], info["height"], info["mpp"]) == (2048, 1536, 0.5)
        assert info["levels"] == client.get("/api/slides/S1").json()["levels"]
        assert 'Width="2048"' in client.get(info["dzi"]).text
        top = info["levels"] - 1
        for tile in ("0_0", "3_2", "8_6"):
            dicom = client.get(f"/api/slides/S1-dicom/image_files/{top}/{tile}.png")
            assert dicom.status_code == 200 and dicom.content == client.get(f"/api/slides/S1/image_files/{top}/{tile}.png").content
        assert client.get("/api/slides/S1-dicom/thumbnail.jpg", params={"size": 64}).status_code == 200


def test_ask_takes_a_dicom_folder_or_one_of_its_files(cohort: dict, world: dict, tmp_path: Path) -> None:  # noqa: F811
    train_job = cohort["job"]
    dim = int(FeatureStore(train_job).load("S1").patch_features.shape[1])
    records = write_records(tmp_path / "qa.jsonl", [
        VQARecord("c", "S1", "WSI", "description", "caption", "Describe the slide.", "Two pieces of tissue."),
    ])
    run_stage(stage_config(world, "stage1", tmp_path / "s1", records=str(records), job=str(train_job),
                           encoder=str(make_encoder_dir(tmp_path / "enc", dim)), train=tiny_train(max_steps=1)))
    assistant = SlideAssistant(tmp_path / "s1", device="cpu", preprocess_workers=0, cache_root=tmp_path / "cache")
    ask_job = tmp_path / "ask_job"
    from_folder = assistant.open_slide(cohort["dicom"], job=ask_job)
    assert (ask_job / "features" / "handcrafted" / "S1-dicom.h5").is_file()
    torch.testing.assert_close(from_folder.summary, assistant.open_slide("S1-dicom", job=train_job).summary)
    torch.testing.assert_close(from_folder.summary, assistant.open_slide(cohort["files"][1], job=ask_job).summary)
    assert isinstance(assistant.conversation(from_folder).ask("Describe the slide.", max_new_tokens=3), str)
