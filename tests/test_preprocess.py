"""`preprocess`: a batch with good and bad slides, the feature files, resume and re-run rules."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from slide_fixtures import (
    write_aperio_slide,
    write_blank_slide,
    write_corrupt_slide,
    write_not_a_slide,
    write_plain_tiff,
    write_truncated_slide,
    write_zero_byte,
)
from slidevl.features import jobs
from slidevl.features.encoders import get_encoder
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore, read_slide_attrs
from slidevl.slide.geojson import mask_polygons
from slidevl.slide.qc import render_qc
from slidevl.slide.reader import open_slide
from slidevl.slide.tissue import TissueParams, segment_slide
from slidevl.tiling.grid import GridSpec, SlideGrid

FAST = PreprocessConfig(workers=0, batch_size=32, progress=False)

BAD = {
    "nompp": "--mpp-override",
    "blank": "no tissue found",
    "zero": "empty (0 bytes)",
    "text": "cannot open as a slide",
    "trunc": "truncated",
    "corrupt": "the file may be truncated or corrupt",
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    slides = root / "slides"
    slides.mkdir()
    write_aperio_slide(slides / "good.svs", 2048, 1536, mpp=0.5)
    write_aperio_slide(slides / "fine.svs", 2048, 1536, mpp=0.25, seed=1)
    write_plain_tiff(slides / "plain.tif", 1024, 768)
    write_aperio_slide(slides / "nompp.svs", 1024, 768, mpp=None)
    write_blank_slide(slides / "blank.svs", 1024, 768)
    write_zero_byte(slides / "zero.svs")
    write_not_a_slide(slides / "text.svs")
    write_truncated_slide(slides / "trunc.svs", 1024, 768)
    write_corrupt_slide(slides / "corrupt.svs")
    (slides / "notes.txt").write_text("not a slide extension: ignored")
    job = root / "job"
    report = preprocess(slides, job, replace(FAST, workers=2, batch_size=16))
    return {"slides": slides, "job": job, "report": report}


def test_batch_completes_despite_bad_slides(batch):
    report = batch["report"]
    by_id = {r.slide_id: r for r in report.results}
    assert sorted(by_id) == sorted(["good", "fine", "plain", *BAD])
    for sid in ("good", "fine", "plain"):
        assert by_id[sid].status == "ok" and by_id[sid].n_patches > 0
    for sid, message in BAD.items():
        assert by_id[sid].status == "failed"
        assert message in by_id[sid].error and sid in by_id[sid].error
    assert report.exit_code == 1


def test_manifest_summary_and_status_files(batch):
    job = batch["job"]
    manifest = json.loads((job / "manifest.json").read_text())
    entries = {e["slide_id"]: e for e in manifest["slides"]}
    assert manifest["counts"] == {"ok": 3, "failed": len(BAD)}
    assert entries["good"]["output"] == "features/handcrafted/good.h5"
    assert set(entries["good"]["timings"]) == {"open", "tissue", "tiling", "qc", "read", "encode", "regions", "write"}
    assert entries["corrupt"]["error"] and entries["corrupt"]["status"] == "failed"
    summary = (job / "summary.md").read_text()
    assert "| good | handcrafted | ok |" in summary and "truncated" in summary
    for sid in entries:
        assert json.loads((job / "status" / "handcrafted" / f"{sid}.json").read_text())["slide_id"] == sid


def test_outputs_written_for_good_slides_only(batch):
    job = batch["job"]
    assert sorted(p.stem for p in (job / "features" / "handcrafted").glob("*.h5")) == ["fine", "good", "plain"]
    for sid in ("good", "fine", "plain", "blank"):  # blank: still a mask and a QC picture to look at
        assert (job / "tissue" / "handcrafted" / f"{sid}.geojson").is_file() and (job / "qc" / "handcrafted" / f"{sid}.png").is_file()
    assert not list(job.rglob("*.partial"))
    # The QC picture is the rendered overview: an RGB PNG of the overview's size, its kept patches tinted.
    store = FeatureStore(job).load("good")
    with open_slide(batch["slides"] / "good.svs") as slide:
        tissue, overview = segment_slide(slide, 0.5, TissueParams())
    grid = SlideGrid(GridSpec(), 2048, 1536, 0.5)
    with Image.open(job / "qc" / "handcrafted" / "good.png") as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (overview.shape[1], overview.shape[0])
        assert np.array_equal(np.asarray(png), np.asarray(render_qc(overview, grid, store.patch_grid, mask_polygons(tissue))))


def test_feature_file_contents_and_provenance(batch):
    store = FeatureStore(batch["job"])
    encoder = get_encoder("handcrafted")
    sf = store.load("fine")
    a = sf.attrs
    assert a["mpp"] == 0.25 and a["mpp_source"] == "property" and a["target_mpp"] == 0.5
    assert a["patch_size_level0"] == 512.0 and a["region_size_level0"] == 8192.0 and a["pack_size"] == 3
    assert a["region_patches"] == 16 and a["read_level_patch"] == 0 and a["patch_resized"] is True
    assert a["encoder"] == "handcrafted" and a["encoder_revision"] == encoder.revision
    assert a["encoder_spec"] == "handcrafted" and a["region_encoder_spec"] == "mean"
    assert a["encoder_provenance"]["name"] == "handcrafted" and a["input_size"] == encoder.input_size
    assert a["segmentation"]["downsample"] == 16.0 and "threshold_used" in a["segmentation"]
    assert a["grid_spec"] == GridSpec().to_dict() and a["slide_vendor"] == "aperio"
    assert a["slide_width"] == 2048 and a["slidevl_version"] and a["created"]
    assert a["config_fingerprint"]["tissue"]["downsample"] == 16.0
    n, d = sf.patch_features.shape
    assert d == encoder.feature_dim and n > 0
    assert (sf.patch_tissue >= 0.25).all() and (sf.patch_tissue <= 1).all()
    grid = SlideGrid(GridSpec(), 2048, 1536, 0.25)
    assert np.array_equal(sf.patch_coords, grid.patch_edges(sf.patch_grid))
    # Row-major order and the pooled regions equal the mean of their patches (float16 on disk).
    assert np.array_equal(np.lexsort((sf.patch_grid[:, 0], sf.patch_grid[:, 1])), np.arange(n))
    for r in range(len(sf.region_grid)):
        members = sf.patch_features[sf.patch_region == r]
        np.testing.assert_allclose(sf.region_features[r], members.mean(0), rtol=2e-3, atol=2e-3)
    assert sf.pack_features.shape == (len(sf.pack_grid), d) and np.isfinite(sf.pack_features).all()
    assert sf.global_feature.shape == (d,)
    assert np.array_equal(sf.pack_grid[sf.patch_pack], sf.patch_grid // 3)


def test_plain_tiff_goes_through_tifffile(batch):
    attrs = read_slide_attrs(FeatureStore(batch["job"]).path("plain"))
    assert attrs["slide_backend"] == "tifffile" and attrs["mpp_read_property"] == "tiff.XResolution"


def test_workers_give_the_same_features_as_in_process(batch, tmp_path):
    report = preprocess(batch["slides"] / "good.svs", tmp_path, FAST)
    assert report.exit_code == 0
    a = FeatureStore(tmp_path).load("good")
    b = FeatureStore(batch["job"]).load("good")
    for name in ("patch_features", "patch_coords", "region_features", "pack_features", "global_feature", "patch_tissue"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_tifffile_reads_give_the_features_openslide_reads_give(batch, tmp_path, monkeypatch):
    """The batch read its Aperio levels through tifffile (verified equal); OpenSlide alone gives the same bytes."""
    from slidevl.features.tiles import WorkItemDataset, patch_items
    from slidevl.slide.tiffreads import TiffFirst

    workers_read = WorkItemDataset(batch["slides"] / "good.svs", patch_items(np.array([[0, 0, 256, 256]]), np.arange(1), 256, 0, 1),
                                   lambda tiles: tiles)
    assert workers_read[0]["error"] is None and workers_read._handle().tiff_levels == (0,)
    workers_read.close()
    monkeypatch.setattr(TiffFirst, "_open_tiff", staticmethod(lambda slide: None))
    for sid in ("good", "fine"):  # level 0 as-is, and level 0 shrunk to 0.5 µm/px
        report = preprocess(batch["slides"] / f"{sid}.svs", tmp_path / sid, FAST)
        assert report.exit_code == 0
        a, b = FeatureStore(tmp_path / sid).load(sid), FeatureStore(batch["job"]).load(sid)
        for name in ("patch_features", "patch_coords", "patch_tissue", "region_features", "pack_features", "global_feature"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (sid, name)
        assert (tmp_path / sid / "tissue" / "handcrafted" / f"{sid}.geojson").read_bytes() == (batch["job"] / "tissue" / "handcrafted" / f"{sid}.geojson").read_bytes()


def test_rerun_skips_complete_slides_and_reruns_changed_ones(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_slide(slides / "s1.svs", 1024, 1024)
    write_aperio_slide(slides / "s2.svs", 1024, 1024, seed=3)
    job = tmp_path / "job"
    first = preprocess(slides, job, FAST)
    assert [r.status for r in first.results] == ["ok", "ok"]
    h5 = FeatureStore(job).path("s1")
    stamp = h5.stat().st_mtime_ns

    again = preprocess(slides, job, FAST)
    assert [r.status for r in again.results] == ["skipped", "skipped"] and again.exit_code == 0
    assert h5.stat().st_mtime_ns == stamp
    assert {e["status"] for e in json.loads((job / "manifest.json").read_text())["slides"]} == {"skipped"}

    # A different configuration makes the existing file stale: "file exists" is not "done".
    changed = preprocess(slides, job, replace(FAST, min_tissue=0.5))
    assert [r.status for r in changed.results] == ["ok", "ok"]
    assert read_slide_attrs(h5)["min_tissue"] == 0.5

    # A missing file or a status that is not ok re-runs the slide; leftovers of a killed write go.
    h5.unlink()
    stale = h5.parent / f".{h5.name}.abc123.partial"
    stale.write_bytes(b"half a file")
    status = jobs.read_status(job, "s2")
    status.status = "running"
    jobs.write_status(job, status)
    rerun = preprocess(slides, job, replace(FAST, min_tissue=0.5))
    assert [r.status for r in rerun.results] == ["ok", "ok"]
    assert h5.is_file() and not stale.exists()

    forced = preprocess(slides, job, replace(FAST, min_tissue=0.5, overwrite=True))
    assert [r.status for r in forced.results] == ["ok", "ok"]


def test_failed_rerun_leaves_previous_outputs_intact(tmp_path):
    slide = write_aperio_slide(tmp_path / "s.svs", 1024, 1024)
    job = tmp_path / "job"
    assert preprocess(slide, job, FAST).exit_code == 0
    h5 = FeatureStore(job).path("s")
    before = {p: p.read_bytes() for p in (h5, job / "tissue" / "handcrafted" / "s.geojson")}
    write_corrupt_slide(slide, 1024, 1024)  # the slide gets damaged; re-run forced
    report = preprocess(slide, job, replace(FAST, overwrite=True))
    assert report.results[0].status == "failed" and report.exit_code == 1
    assert h5.read_bytes() == before[h5]
    assert FeatureStore(job).load("s").n_patches > 0
    assert not list(job.rglob("*.partial"))


def test_mpp_override_and_csv_rescue_a_slide_without_mpp(tmp_path):
    slide = write_aperio_slide(tmp_path / "nompp.svs", 2048, 2048, mpp=None)
    over = preprocess(slide, tmp_path / "a", replace(FAST, mpp_override=0.5))
    assert over.exit_code == 0
    attrs = read_slide_attrs(FeatureStore(tmp_path / "a").path("nompp"))
    assert (attrs["mpp"], attrs["mpp_source"], attrs["mpp_read_x"]) == (0.5, "override", None)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnompp,0.25\n")
    viacsv = preprocess(slide, tmp_path / "b", FAST.with_mpp_csv(csv))
    assert viacsv.exit_code == 0
    attrs = read_slide_attrs(FeatureStore(tmp_path / "b").path("nompp"))
    assert (attrs["mpp"], attrs["mpp_source"], attrs["patch_size_level0"]) == (0.25, "csv", 512.0)


def test_shards_cover_every_slide_exactly_once(tmp_path):
    names = [tmp_path / f"slide_{c}.svs" for c in "gbfadce"]
    for n in range(1, 5):
        parts = [jobs.shard_slides(names, (i, n)) for i in range(n)]
        flat = [p for part in parts for p in part]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
        assert parts == [jobs.shard_slides(list(reversed(names)), (i, n)) for i in range(n)]  # order-independent
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_aperio_slide(slides / f"s{i}.svs", 768, 768, seed=i)
    reports = [preprocess(slides, tmp_path / "job", replace(FAST, shard=(i, 2))) for i in range(2)]
    done = sorted(r.slide_id for rep in reports for r in rep.results)
    assert done == ["s0", "s1", "s2"]
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert [e["slide_id"] for e in manifest["slides"]] == ["s0", "s1", "s2"]
    assert manifest["counts"] == {"ok": 3}


def test_discovery_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(jobs.UsageError, match="no slides found"):
        jobs.discover_slides(tmp_path / "empty")
    with pytest.raises(jobs.UsageError, match="no such file"):
        jobs.discover_slides(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_zero_byte(tmp_path / "a" / "x.svs")
    write_zero_byte(tmp_path / "b" / "x.tif")
    with pytest.raises(jobs.UsageError, match="share the id 'x'"):
        jobs.discover_slides([tmp_path / "a", tmp_path / "b"])


def test_status_survives_garbage(tmp_path):
    path = jobs.status_path(tmp_path, "s")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert jobs.read_status(tmp_path, "s") is None
    jobs.rebuild_manifest(tmp_path)  # ignores it rather than failing
    assert json.loads((tmp_path / "manifest.json").read_text())["slides"] == []


def test_copying_a_job_keeps_it_complete(tmp_path):
    slide = write_aperio_slide(tmp_path / "s.svs", 768, 768)
    preprocess(slide, tmp_path / "job", FAST)
    shutil.copytree(tmp_path / "job", tmp_path / "moved")
    os.utime(FeatureStore(tmp_path / "moved").path("s"))
    assert preprocess(slide, tmp_path / "moved", FAST).results[0].status == "skipped"


@pytest.mark.parametrize("sid, source", [("good", "mosaic"), ("fine", "pack box")])
def test_pack_features_equal_a_direct_read_of_the_pack_box(batch, sid, source):
    from slidevl.slide.reader import open_slide

    sf = FeatureStore(batch["job"]).load(sid)
    assert source in sf.attrs["pack_feature_source"]
    encoder = get_encoder("handcrafted")
    grid = SlideGrid(GridSpec(), sf.attrs["slide_width"], sf.attrs["slide_height"], sf.attrs["mpp"])
    boxes = grid.cell_boxes(sf.pack_grid, 3)
    with open_slide(batch["slides"] / f"{sid}.svs") as slide:
        images = np.stack([slide.read_box(b, encoder.input_size, sf.attrs["read_level_pack"]) for b in boxes])
    expected = encoder.encode_tiles(images).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(sf.pack_features, expected, rtol=1e-3, atol=1e-3)


def test_thumbnail_is_padded_to_a_white_square():
    from slidevl.features.pipeline import thumbnail_square

    overview = np.zeros((100, 300, 3), np.uint8)  # a black, wide slide
    thumb = thumbnail_square(overview, 60)
    assert thumb.shape == (60, 60, 3)
    assert (thumb[:20] == 255).all() and (thumb[40:] == 255).all()  # padding above and below
    assert (thumb[21:39] == 0).all()  # the slide, centred



def test_a_manifest_rebuild_waits_for_the_one_in_progress(tmp_path: Path) -> None:
    """Array tasks and two encoders' runs ending together rebuild the manifest one at a time.

    Unlocked, a task that read the statuses before another task wrote its last one could
    write its stale manifest last, or drop the other encoder's ``configs`` entry.
    """
    import fcntl
    import subprocess
    import sys

    from slidevl.features import jobs

    jobs.write_status(tmp_path, jobs.SlideStatus(slide_id="a", slide_path="/x/a.svs", status="ok", encoder_folder="uni"))
    code = f"from slidevl.features import jobs; jobs.rebuild_manifest({str(tmp_path)!r}, {{}}, None, 'uni')"
    with open(tmp_path / jobs.MANIFEST_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another task's rebuild in progress
        rebuild = subprocess.Popen([sys.executable, "-c", code])  # a separate process: it inherits no lock
        with pytest.raises(subprocess.TimeoutExpired):
            rebuild.wait(5.0)
        assert jobs.read_manifest(tmp_path) is None
    assert rebuild.wait(60) == 0
    assert [row["slide_id"] for row in jobs.read_manifest(tmp_path)["slides"]] == ["a"]
