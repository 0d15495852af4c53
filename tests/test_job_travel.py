"""Job folders that travel: slide paths that resolve from anywhere, relocation, and `slidevl job check`.

A "site" is made the way `make demo` makes one: preprocess runs in a subprocess whose
working directory is the site, with relative paths (``cohort/slides`` -> ``job``). The
tests then move things around and use the job from other working directories, with
real slide reads (OpenSlide), real HDF5 stores and real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from slide_fixtures import write_aperio_slide
from test_slidellm_fixtures import world  # noqa: F401  (a fixture, used by name)
from typer.testing import CliRunner

from rich.console import Console

from slidevl.features import jobs
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.job_cli import job_app
from slidevl.features.slidepaths import SlideChangedError, SlideNotFoundError, file_fingerprint
from slidevl.features.store import FeatureStore
from slidevl.serve.app import create_app
from slidevl.serve.job import ServeJob
from slidevl.survival.checkpoint import save_checkpoint
from slidevl.survival.cli import app as survival_app
from slidevl.survival.registry import build_model

SLIDES = ("A", "B", "C")
PREPROCESS = "from slidevl.features.cli import app; app()"
runner = CliRunner()


def _preprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PREPROCESS, "preprocess", *args, "--workers", "0", "--no-progress"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Slides and a job preprocessed from inside the site with relative paths, as `make demo` does.

    Each test makes its own: a copy would record the original's absolute paths.
    """
    site = tmp_path / "site"
    slides = site / "cohort" / "slides"
    slides.mkdir(parents=True)
    for k, sid in enumerate(SLIDES):
        write_aperio_slide(slides / f"{sid}.svs", 1024, 768, seed=k)
    with monkeypatch.context() as m:
        m.chdir(site)
        report = preprocess(Path("cohort/slides"), Path("job"), PreprocessConfig(workers=0, progress=False),
                            console=Console(quiet=True))
    assert report.exit_code == 0, [(r.slide_id, r.error) for r in report.results]
    return site


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test body from an unrelated working directory."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    return other


def _status(job: Path, sid: str) -> dict:
    return json.loads((job / "status" / "handcrafted" / f"{sid}.json").read_text())


def _row(job: Path, sid: str) -> dict:
    return next(r for r in json.loads((job / "manifest.json").read_text())["slides"] if r["slide_id"] == sid)


def _moved_slides(site: Path, tmp_path: Path) -> Path:
    """Move the slide folder out of the site; return its new place."""
    new = tmp_path / "archive" / "slides"
    new.parent.mkdir()
    shutil.move(site / "cohort" / "slides", new)
    return new


def test_slides_are_recorded_absolute_and_relative_to_the_job(site: Path) -> None:
    job = site / "job"
    status, row = _status(job, "A"), _row(job, "A")
    slide = site / "cohort" / "slides" / "A.svs"
    assert status["slide_path"] == str(slide.resolve()) and Path(status["slide_path"]).is_absolute()
    assert status["slide_relpath"] == os.path.join("..", "cohort", "slides", "A.svs")
    assert status["slide_bytes"] == slide.stat().st_size and status["slide_fingerprint"] == file_fingerprint(slide)
    assert {k: row[k] for k in ("slide_path", "slide_relpath", "slide_bytes", "slide_fingerprint")} == \
        {k: status[k] for k in ("slide_path", "slide_relpath", "slide_bytes", "slide_fingerprint")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_from_another_directory(site: Path, elsewhere: Path) -> None:
    """`slidevl serve /abs/job` started in another directory serves the slide images."""
    port = _free_port()
    code = "import sys; from slidevl.serve.cli import app; sys.argv[0] = 'slidevl serve'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(site / "job"), "--port", str(port)], cwd=elsewhere,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(f"{base}/api/info", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        for sid in SLIDES:
            assert httpx.get(f"{base}/api/slides/{sid}/thumbnail.jpg", timeout=30).status_code == 200
        top = httpx.get(f"{base}/api/slides/A", timeout=30).json()["levels"] - 1
        tile = httpx.get(f"{base}/api/slides/A/image_files/{top}/0_0.jpeg", timeout=30)
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_old_records_work_from_the_directory_they_were_made_in(site: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Records written before paths were absolute hold the path relative to where preprocess ran."""
    job = site / "job"
    status = _status(job, "A")
    legacy = {k: v for k, v in status.items() if k not in ("slide_relpath", "slide_bytes", "slide_fingerprint")}
    jobs.write_status(job, jobs.SlideStatus.from_dict({**legacy, "slide_path": "cohort/slides/A.svs"}))
    jobs.rebuild_manifest(job)
    monkeypatch.chdir(site)
    assert ServeJob("job").slide_file("A") == (site / "cohort" / "slides" / "A.svs")
    moved = Path(shutil.move(job, tmp_path / "moved_job"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlideNotFoundError, match=r"tried .*cohort/slides/A\.svs.*--slides-root DIR.*slidevl job relocate"):
        ServeJob(moved).slide_file("A")
    assert ServeJob(moved, slides_root=site / "cohort" / "slides").slide_file("A") == site / "cohort" / "slides" / "A.svs"


def test_job_and_slides_moved_together_then_relocated(site: Path, tmp_path: Path, elsewhere: Path) -> None:
    moved = Path(shutil.move(site, tmp_path / "drive" / "project"))
    job, slides = moved / "job", moved / "cohort" / "slides"
    # The absolute paths are gone; the job-relative ones still lead to the slides.
    assert ServeJob(job).slide_file("B") == slides / "B.svs"
    result = runner.invoke(job_app, ["relocate", str(job), "--slides-root", str(slides)])
    assert result.exit_code == 0, result.output
    assert "relocated 3 slide(s)" in result.output
    for sid in SLIDES:
        assert _status(job, sid)["slide_path"] == str(slides / f"{sid}.svs") == _row(job, sid)["slide_path"]
    assert runner.invoke(job_app, ["check", str(job)]).exit_code == 0
    with TestClient(create_app(ServeJob(job))) as client:
        assert client.get("/api/slides/C/thumbnail.jpg").status_code == 200


def test_slides_moved_without_the_job(site: Path, tmp_path: Path, elsewhere: Path) -> None:
    job = site / "job"
    new = _moved_slides(site, tmp_path)
    with TestClient(create_app(ServeJob(job))) as client:
        r = client.get("/api/slides/A/image.dzi")
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert str(site / "cohort" / "slides" / "A.svs") in detail  # the path tried
    assert "--slides-root DIR" in detail and "slidevl job relocate" in detail  # the fix
    with TestClient(create_app(ServeJob(job, slides_root=new))) as client:
        assert client.get("/api/slides/A/image.dzi").status_code == 200
    # A rerun needs the slides: refused with the same explanation, then done with --slides-root.
    refused = _preprocess(elsewhere, "--out", str(job))
    assert refused.returncode == 2 and "file not found" in refused.stderr and "--slides-root" in refused.stderr
    rerun = _preprocess(elsewhere, "--out", str(job), "--slides-root", str(new))
    assert rerun.returncode == 0 and "0 ok, 3 skipped" in rerun.stdout, rerun.stdout + rerun.stderr
    # A rerun records where the slides are now.
    assert _status(job, "B")["slide_path"] == str(new / "B.svs") == _row(job, "B")["slide_path"]


def _survival_checkpoint(job: Path, out: Path) -> Path:
    torch.manual_seed(0)
    dim = FeatureStore(job).load("A").patch_features.shape[1]
    model = build_model("abmil", in_dim=dim, region_dim=dim, n_bins=4)
    save_checkpoint(out, model, {"fold": 0, "bins": {"edges": [0.0, 12.0, 30.0, 60.0, 120.0], "mode": "all"},
                                 "region_tokens": "auto", "feature_encoder": FeatureStore(job).encoder, "scaler": None})
    return out


def test_predicting_from_another_directory_and_after_the_slides_moved(site: Path, tmp_path: Path, elsewhere: Path) -> None:
    job = site / "job"
    checkpoint = _survival_checkpoint(job, tmp_path / "run" / "fold_0")
    base = ["predict", "--checkpoint", str(checkpoint), "--job", str(job)]
    first = runner.invoke(survival_app, [*base, "A"])
    assert first.exit_code == 0, first.output
    risk = json.loads(first.stdout)["risk"]
    # Slides moved and A's features gone: the error names the path tried and the fix.
    new = _moved_slides(site, tmp_path)
    FeatureStore(job).path("A").unlink()
    failed = runner.invoke(survival_app, [*base, "A"])
    assert failed.exit_code == 2
    assert str(site / "cohort" / "slides" / "A.svs") in failed.output and "--slides-root" in failed.output
    again = runner.invoke(survival_app, [*base, "A", "--slides-root", str(new)])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["risk"] == pytest.approx(risk, abs=1e-4)  # recomputed from the same file
    assert _status(job, "A")["slide_path"] == str(new / "A.svs")


@pytest.mark.parametrize("how", ["another slide", "same size, other bytes"])
def test_a_changed_slide_file_is_reported_never_paired(site: Path, tmp_path: Path, elsewhere: Path, how: str) -> None:
    job = site / "job"
    new = _moved_slides(site, tmp_path)
    slide = new / "A.svs"
    if how == "another slide":
        write_aperio_slide(slide, 1024, 768, seed=9)
    else:
        data = bytearray(slide.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
        slide.write_bytes(bytes(data))
    before = {sid: (job / "status" / "handcrafted" / f"{sid}.json").read_bytes() for sid in SLIDES}
    result = runner.invoke(job_app, ["relocate", str(job), "--slides-root", str(new)])
    assert result.exit_code == 1 and "changed" in result.output and "nothing was changed" in result.output
    assert {sid: (job / "status" / "handcrafted" / f"{sid}.json").read_bytes() for sid in SLIDES} == before
    with pytest.raises(SlideChangedError, match="not the file that was preprocessed"):
        ServeJob(job, slides_root=new).slide_file("A")
    with TestClient(create_app(ServeJob(job, slides_root=new))) as client:
        r = client.get("/api/slides/A/thumbnail.jpg")
    assert r.status_code == 409 and "not the file that was preprocessed" in r.json()["detail"]
    checked = runner.invoke(job_app, ["check", str(job), "--slides-root", str(new)])
    assert checked.exit_code == 1 and "point --slides-root at the original file" in checked.output
    # Preprocessing that file recomputes it rather than keeping the old file's features.
    rerun = _preprocess(elsewhere, str(slide), "--out", str(job))
    assert "1 skipped" not in rerun.stdout, rerun.stdout


def test_job_check_and_fix(site: Path, tmp_path: Path, elsewhere: Path) -> None:
    """A truncated store (A), a missing slide (B) and a stale manifest row (C), before and after --fix."""
    job = site / "job"
    store = FeatureStore(job)
    data = store.path("A").read_bytes()
    store.path("A").write_bytes(data[: len(data) // 2])
    new = tmp_path / "archive"
    new.mkdir()
    shutil.move(site / "cohort" / "slides" / "B.svs", new / "B.svs")
    manifest = json.loads((job / "manifest.json").read_text())
    next(r for r in manifest["slides"] if r["slide_id"] == "C")["n_patches"] = 1
    (job / "manifest.json").write_text(json.dumps(manifest))

    first = runner.invoke(job_app, ["check", str(job)])
    assert first.exit_code == 1
    out = first.output
    assert "features/handcrafted/A.h5 unreadable: " in out and "truncated" in out
    assert "file not found; tried" in out and "slidevl job relocate" in out
    assert "differs from the status in n_patches" in out
    assert "3 of 3 slide(s) need attention" in out

    untouched = {sid: (job / "status" / "handcrafted" / f"{sid}.json").read_bytes() for sid in ("B", "C")}
    fixed = runner.invoke(job_app, ["check", str(job), "--fix"])
    assert fixed.exit_code == 1  # A must still be recomputed and B found
    assert "fixed A: feature store broken" in fixed.output and "rebuilt manifest.json" in fixed.output
    assert not store.path("A").exists() and (store.root / "A.h5.broken").is_file()
    assert _status(job, "A")["status"] == "failed" and "marked for recomputation" in _status(job, "A")["error"]
    assert {sid: (job / "status" / "handcrafted" / f"{sid}.json").read_bytes() for sid in ("B", "C")} == untouched
    assert _row(job, "C")["n_patches"] == _status(job, "C")["n_patches"]
    assert json.loads((job / "manifest.json").read_text())["config"] == manifest["config"]  # kept through the rebuild
    assert "2 of 3 slide(s) need attention" in fixed.output

    rerun = _preprocess(elsewhere, "--out", str(job), "--slides-root", str(new))
    assert rerun.returncode == 0 and "1 ok, 2 skipped" in rerun.stdout, rerun.stdout + rerun.stderr
    final = runner.invoke(job_app, ["check", str(job)])
    assert final.exit_code == 0 and "all 3 slide(s) are fine" in final.output, final.output


def test_asking_from_another_directory_and_after_the_slides_moved(site: Path, tmp_path: Path, elsewhere: Path,
                                                                  world: dict[str, Path]) -> None:
    from test_slidellm_fixtures import make_encoder_dir, stage_config, tiny_train

    from slidevl.qa.records import VQARecord, write_records
    from slidevl.slidellm.ask_cli import app as ask_app
    from slidevl.slidellm.tuning.stages import run_stage

    job = site / "job"
    records = write_records(tmp_path / "qa.jsonl", [
        VQARecord(f"c-{sid}", sid, "WSI", "description", "caption", "Describe the slide.", "Tissue on glass.") for sid in SLIDES
    ])
    dim = int(FeatureStore(job).load("A").patch_features.shape[1])
    run_stage(stage_config(world, "stage1", tmp_path / "s1", records=str(records), job=str(job),
                           encoder=str(make_encoder_dir(tmp_path / "enc", dim)), train=tiny_train(max_steps=1)))
    base = ["Describe the slide.", "--checkpoint", str(tmp_path / "s1"), "--job", str(job), "--device", "cpu",
            "--cache", str(tmp_path / "cache"), "--max-new-tokens", "2"]
    assert runner.invoke(ask_app, ["A", *base]).exit_code == 0
    new = _moved_slides(site, tmp_path)
    FeatureStore(job).path("B").unlink()
    failed = runner.invoke(ask_app, ["B", *base])
    assert failed.exit_code == 2
    assert str(site / "cohort" / "slides" / "B.svs") in failed.output and "--slides-root" in failed.output
    again = runner.invoke(ask_app, ["B", *base, "--slides-root", str(new)])
    assert again.exit_code == 0, again.output
    assert FeatureStore(job).path("B").is_file() and _status(job, "B")["slide_path"] == str(new / "B.svs")
