"""Viewer building blocks: geometry, tile cache, job folder reading, answerer, survival panel, CLI guard."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_fixtures import SLIDES, shared_job, tissue_area_mm2
from typer.testing import CliRunner

from slidevl.atomic import write_json_atomic
from slidevl.features.store import FeatureStore
from slidevl.serve.answerer import Answerer
from slidevl.serve.jobfacts import JobFactsAnswerer
from slidevl.serve.cli import RemoteBindError, check_bind_host, is_loopback
from slidevl.serve.cli import app as cli_app
from slidevl.serve.geometry import (
    GeoJSONError,
    area_px,
    clip_ring,
    polygons_from_geojson,
    shoelace,
)
from slidevl.serve.job import JobError, NotAvailableError, ServeJob, UnknownSlideError
from slidevl.serve.risk import SurvivalRun
from slidevl.serve.tiles import ByteLRU, TileRangeError, TileService

TOY = SLIDES[0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shared_job(tmp_path_factory)


# -- geometry --------------------------------------------------------------------------------
def test_clip_and_area_of_a_concave_polygon_with_a_hole() -> None:
    # An L shape (area 3 of a 2x2 square missing its top-right unit) with a 0.5x0.5 hole.
    outer = [[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2], [0, 0]]
    hole = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]
    polys = polygons_from_geojson({"type": "Polygon", "coordinates": [outer, hole]})
    assert area_px(polys) == pytest.approx(3 - 0.25)
    assert area_px(polys, (0, 0, 1, 1)) == pytest.approx(1 - 0.25)
    assert area_px(polys, (1, 1, 2, 2)) == pytest.approx(0.0)
    assert area_px(polys, (0.5, 0.5, 1.5, 1.5)) == pytest.approx(0.75 - 0.0625)
    assert area_px(polys, (5, 5, 6, 6)) == 0.0


def test_clip_ring_triangle() -> None:
    tri = np.array([[0, 0], [4, 0], [0, 4]], float)
    assert shoelace(tri) == 8
    assert shoelace(clip_ring(tri, (0, 0, 2, 2))) == pytest.approx(4.0)
    assert shoelace(clip_ring(tri, (1, 1, 3, 3))) == pytest.approx(2.0)


def test_geojson_collections_and_errors() -> None:
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square], [[[20, 0], [30, 0], [30, 10], [20, 0]]]]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}},
        {"type": "Feature", "geometry": None},
    ]}
    assert area_px(polygons_from_geojson(fc)) == pytest.approx(150)
    with pytest.raises(GeoJSONError):
        polygons_from_geojson({"type": "Blob"})
    with pytest.raises(GeoJSONError):
        polygons_from_geojson({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})


# -- tile cache ------------------------------------------------------------------------------
def test_byte_lru_evicts_least_recent_by_size() -> None:
    lru = ByteLRU(10)
    lru.put(("a",), b"1234")
    lru.put(("b",), b"1234")
    assert lru.get(("a",)) == b"1234"  # a is now most recent
    lru.put(("c",), b"1234")           # 12 bytes > 10: evict b
    assert lru.get(("b",)) is None and lru.get(("a",)) is not None and lru.get(("c",)) is not None
    lru.put(("huge",), b"x" * 11)      # larger than the whole cache: not stored
    assert lru.get(("huge",)) is None
    assert lru.stats()["bytes"] == 8 and lru.stats()["hits"] == 3 and lru.stats()["misses"] == 2


def test_tile_service_threads_share_one_generator(paths: dict[str, Path]) -> None:
    job = ServeJob(paths["job"])
    tiles = TileService(job.slide_file, cache_bytes=0)  # no cache: every call renders
    top = tiles.meta(TOY.slide_id).levels - 1
    expected = {(c, r): tiles.tile(TOY.slide_id, top, c, r, "png") for c in range(3) for r in range(3)}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for c, r in expected:
                assert tiles.tile(TOY.slide_id, top, (c + k) % 3, r, "png") == expected[((c + k) % 3, r)]
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(tiles._slides) == 1
    with pytest.raises(TileRangeError):
        tiles.tile(TOY.slide_id, top + 1, 0, 0, "jpeg")
    with pytest.raises(TileRangeError):
        tiles.tile(TOY.slide_id, top, 0, 0, "bmp")
    tiles.close()


# -- job folder ------------------------------------------------------------------------------
def _entry(manifest: dict, slide_id: str) -> dict:
    return next(e for e in manifest["slides"] if e["slide_id"] == slide_id)


def test_manifest_is_reread_when_it_changes(paths: dict[str, Path], tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    manifest = json.loads((paths["job"] / "manifest.json").read_text())
    write_json_atomic(job_dir / "manifest.json", {**manifest, "slides": [_entry(manifest, "TOY-01")]})
    job = ServeJob(job_dir)
    assert [e.slide_id for e in job.slides()] == ["TOY-01"]
    write_json_atomic(job_dir / "manifest.json", manifest)
    os.utime(job_dir / "manifest.json", (1e9, 1e9))  # a distinct mtime even on coarse clocks
    assert sorted(e.slide_id for e in job.slides()) == ["BROKEN-03", "TOY-01", "TOY-02"]
    with pytest.raises(UnknownSlideError):
        job.get("NOPE")
    with pytest.raises(NotAvailableError):  # this copy of the job has no feature files
        job.patches("TOY-01")


@pytest.mark.parametrize("slide_id", ["../etc/passwd", "a/b", ".hidden", "", None, "x" * 300, "a\\..\\b"])
def test_unsafe_ids_in_a_manifest_are_refused(tmp_path: Path, slide_id) -> None:
    write_json_atomic(tmp_path / "manifest.json", {"slides": [{"slide_id": slide_id, "status": "ok"}]})
    with pytest.raises(JobError, match="manifest"):
        ServeJob(tmp_path)


@pytest.mark.parametrize("content", ["not json", json.dumps([1, 2]), json.dumps({"slides": "x"}), json.dumps({"slides": [3]})])
def test_bad_manifests_name_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(JobError, match="manifest.json"):
        ServeJob(tmp_path)


def test_missing_job_and_run_folders(tmp_path: Path, paths: dict[str, Path]) -> None:
    with pytest.raises(JobError, match="slidevl preprocess"):
        ServeJob(tmp_path)
    with pytest.raises(JobError, match="survival run"):
        ServeJob(paths["job"], survival_run=tmp_path / "nope")


def test_manifest_paths_outside_the_job_are_ignored(paths: dict[str, Path], tmp_path: Path) -> None:
    manifest = json.loads((paths["job"] / "manifest.json").read_text())
    entry = dict(_entry(manifest, "TOY-01"), tissue="../../../../etc/hosts", output="/etc/passwd")
    write_json_atomic(tmp_path / "manifest.json", {"slides": [entry]})
    job = ServeJob(tmp_path)
    assert job.file_for("TOY-01", "tissue") is None and job.file_for("TOY-01", "features") is None


def test_relative_slide_path_is_found_next_to_the_job(paths: dict[str, Path]) -> None:
    manifest = json.loads((paths["job"] / "manifest.json").read_text())
    entry = dict(_entry(manifest, "TOY-01"), slide_path=f"slides/{TOY.slide_id}.tiff")
    write_json_atomic(paths["job"].parent / "rel" / "manifest.json", {"slides": [entry]})
    job = ServeJob(paths["job"].parent / "rel")
    assert job.slide_file("TOY-01") == (paths["slides"] / f"{TOY.slide_id}.tiff").resolve()


# -- answerer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def answerer(paths: dict[str, Path]) -> JobFactsAnswerer:
    job = ServeJob(paths["job"], survival_run=paths["run"])
    return JobFactsAnswerer(job, TileService(job.slide_file).meta)


def test_answerer_follows_the_protocol(answerer: JobFactsAnswerer) -> None:
    assert isinstance(answerer, Answerer)


def test_answerer_facts(answerer: JobFactsAnswerer, paths: dict[str, Path]) -> None:
    ask = lambda q, bbox=None: answerer.answer(TOY.slide_id, q, bbox, [])  # noqa: E731
    assert "0.5 µm per pixel" in ask("What magnification / mpp?") and "20x" in ask("resolution?")
    assert "3,072 × 2,048 pixels" in ask("how big is the slide?") and "1.54 × 1.02 mm" in ask("size")
    box = (768, 512, 1280, 1024)  # well inside the tissue rectangle
    coords = FeatureStore(paths["job"]).load(TOY.slide_id).patch_coords + 128
    inside = int(((coords[:, 0] >= 768) & (coords[:, 0] < 1280) & (coords[:, 1] >= 512) & (coords[:, 1] < 1024)).sum())
    assert inside == 4 and f"There are {inside} tissue patches of 128 µm" in ask("how many patches here?", box)
    area = ask("tissue area?", box)
    assert f"Tissue covers {tissue_area_mm2(TOY, box):.3f} mm²" in area and "(100% of the rectangle)" in area
    edge = ask("tissue area?", (0, 0, 1024, 768))  # straddles the glass: about half tissue
    assert f"({100 * tissue_area_mm2(TOY, (0, 0, 1024, 768)) / (1024 * 768 * 0.25e-6):.0f}% of the rectangle)" in edge
    assert "1 region(s)" in ask("how many regions?")
    assert "roi-1 (tumour nest)" in ask("which ROIs are here?", (0, 0, 1000, 1000))
    assert "roi-2" not in ask("which ROIs are here?", (0, 0, 1000, 1000))
    assert "No ROI overlaps" in ask("any roi?", (2900, 1900, 3000, 2000))
    ev = ask("which prompt does the evidence match?", box)
    assert ev.startswith("Rectangle [768, 512, 1280, 1024] (256 µm × 256 µm): Survival evidence (hila): patch opl tokens: ")
    assert "region opl tokens: 1 kept tokens" in ev and "“high risk: necrosis”" in ev
    assert "Preprocessing status: ok" in ask("what is the status?")
    overview = ask("Tell me about it")
    assert overview.startswith("I answer from the job's measurements") and "mm²" in overview


def test_answerer_without_optional_outputs(paths: dict[str, Path]) -> None:
    job = ServeJob(paths["job"])  # no survival run, and TOY-02 has no ROIs
    a = JobFactsAnswerer(job, TileService(job.slide_file).meta)
    assert "--survival-run" in a.answer("TOY-02", "evidence?", None, [])
    assert "No ROIs" in a.answer("TOY-02", "roi?", None, [])


# -- survival panel --------------------------------------------------------------------------
def test_survival_run_problems_are_named(paths: dict[str, Path], tmp_path: Path) -> None:
    job = ServeJob(paths["job"])
    with pytest.raises(NotAvailableError, match="oof_risks.csv"):
        SurvivalRun(tmp_path, job).for_slide("TOY-01")
    (tmp_path / "oof_risks.csv").write_text("patient_id,risk\nP1,0.3\n")
    with pytest.raises(JobError, match="missing columns"):
        SurvivalRun(tmp_path, job).for_slide("TOY-01")
    (tmp_path / "oof_risks.csv").write_text("patient_id,fold,risk,t,e\nP1,0,0.3,5,1\nP2,1,0.1,9,0\nP3,2,0.9,2,1\n")
    with pytest.raises(NotAvailableError, match="patient is unknown"):  # no evidence, no clinical table
        SurvivalRun(tmp_path, job).for_slide("TOY-01")
    (tmp_path / "clinical.csv").write_text("pathology_id,patient_id,e,t\nTOY-01,P3,1,2\nTOY-02,P9,0,4\n")
    write_json_atomic(tmp_path / "summary.json", {"cohort": {"clinical": "clinical.csv"}, "c_index": {"mean": 0.7}})
    d = SurvivalRun(tmp_path, job).for_slide("TOY-01")  # found through the clinical table, relative to the run
    assert d["patient"]["patient_id"] == "P3" and d["patient"]["group"] == "high" and d["patient"]["km_s"] == 0.0
    assert d["patient"]["curve"] is None and "fold_2" in d["patient"]["curve_note"]
    assert d["summary"]["c_index_mean"] == 0.7 and d["summary"]["c_index_std"] is None
    with pytest.raises(NotAvailableError, match="no out-of-fold risk"):
        SurvivalRun(tmp_path, job).for_slide("TOY-02")


# -- CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                      ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False)])
def test_loopback_guard(host: str, ok: bool) -> None:
    assert is_loopback(host) is ok
    if ok:
        check_bind_host(host, allow_remote=False)
    else:
        with pytest.raises(RemoteBindError, match="--allow-remote"):
            check_bind_host(host, allow_remote=False)
        check_bind_host(host, allow_remote=True)


def test_cli_refuses_remote_bind_and_bad_folders(paths: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli_app, [str(paths["job"]), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output
    r = runner.invoke(cli_app, [str(tmp_path)])
    assert r.exit_code == 2 and "no manifest" in r.output
    r = runner.invoke(cli_app, [str(paths["job"]), "--vqa-checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "VQA checkpoint not found" in r.output
    r = runner.invoke(cli_app, [str(paths["job"]), "--survival-run", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "survival run folder not found" in r.output


def test_cli_serves_the_job_on_loopback(paths: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from slidevl.serve.cli import app; sys.argv[0] = 'slidevl serve'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(paths["job"]), "--port", str(port),
                             "--survival-run", str(paths["run"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
                time.sleep(0.2)
        assert info["job"] == "job" and info["survival_run"] == "run" and info["answerer"]["name"] == "job-facts"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "slidevl viewer for" in proc.stdout.read()
