"""`preprocess` on Ray writes the job a local run writes, and survives a killed worker."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import ray

from slide_fixtures import write_aperio_slide
from slidevl.features.config import PreprocessConfig
from slidevl.features.executors import RayExecutor, make_executor
from slidevl.features.jobs import UsageError
from slidevl.features.pipeline import JobReport, preprocess

CONFIG = PreprocessConfig(workers=1, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    write_aperio_slide(folder / "a.svs", 2048, 1536)
    write_aperio_slide(folder / "b.svs", 6144, 4608, seed=5)  # big enough to be killed mid-slide
    (folder / "broken.svs").write_bytes(b"not a slide")  # failure isolation
    return folder


@pytest.fixture(scope="module")
def local_job(slides, tmp_path_factory) -> Path:
    job = tmp_path_factory.mktemp("local") / "job"
    preprocess(slides, job, CONFIG)
    return job


def _files(job: Path) -> set[str]:
    return {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file()}


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_features(job: Path, reference: Path, slide_id: str) -> None:
    path = f"features/handcrafted/{slide_id}.h5"
    got, want = _datasets(job / path), _datasets(reference / path)
    assert got.keys() == want.keys()
    for key in want:
        # float16 on disk: equal up to one float16 rounding step
        np.testing.assert_allclose(got[key].astype(np.float64), want[key].astype(np.float64), rtol=2**-10, atol=1e-6,
                                   err_msg=key)


def _statuses(job: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (job / "status" / "handcrafted").glob("*.json")}


def _assert_nothing_half_written(job: Path) -> None:
    assert not [p for p in job.rglob("*") if p.name.endswith(".partial")]
    assert all(s["status"] != "running" for s in _statuses(job).values())


def test_ray_job_equals_local_job_and_resumes(local_ray, slides, local_job, tmp_path):
    job = tmp_path / "job"
    report = preprocess(slides, job, CONFIG, executor=RayExecutor())
    assert (report.n_ok, report.n_failed, report.exit_code) == (2, 1, 1)
    assert _files(job) == _files(local_job)
    for slide_id in ("a", "b"):
        _assert_same_features(job, local_job, slide_id)
    manifest, reference = (json.loads((j / "manifest.json").read_text()) for j in (job, local_job))
    assert manifest["counts"] == reference["counts"] == {"ok": 2, "failed": 1}
    assert _statuses(job)["broken"]["error"] == _statuses(local_job)["broken"]["error"]
    _assert_nothing_half_written(job)

    again = preprocess(slides, job, CONFIG, executor=RayExecutor())
    assert (again.n_skipped, again.n_ok, again.n_failed) == (2, 0, 1)  # complete slides are skipped, as locally


def _status_of(job: Path, slide_id: str) -> str | None:
    try:
        return json.loads((job / "status" / "handcrafted" / f"{slide_id}.json").read_text())["status"]
    except (OSError, ValueError):
        return None


def _kill_worker_of(job: Path, slide_id: str, run: threading.Thread, timeout: float = 60.0) -> None:
    """SIGKILL the Ray worker while it processes ``slide_id`` (its process title is ``ray::slide <id>``).

    The worker is stopped (SIGSTOP) before it is killed, and killed only if, stopped, it still
    holds the slide unfinished: a kill that lands after the task returned would hit an idle
    worker instead, which Ray then hands the next task.
    """
    title = f"ray::slide {slide_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.is_alive(), "preprocess finished before the worker could be killed"
        if _status_of(job, slide_id) == "running":
            for worker in psutil.process_iter(["cmdline"]):
                if (worker.info["cmdline"] or [""])[0] != title:
                    continue
                try:
                    worker.suspend()
                    if worker.cmdline()[0] == title and _status_of(job, slide_id) == "running":
                        worker.kill()  # the task writes the slide's status itself: stopped, it is mid-slide
                        return
                    worker.resume()
                except psutil.NoSuchProcess:
                    continue  # the worker ended between the listing and the signal
        time.sleep(0.01)
    raise AssertionError(f"no Ray worker was seen processing {slide_id}")


@pytest.mark.parametrize("max_retries, expected", [(1, "ok"), (0, "failed")])
def test_killed_worker_is_retried_or_reported(local_ray, slides, local_job, tmp_path, max_retries, expected):
    job = tmp_path / "job"
    reports: list[JobReport] = []
    run = threading.Thread(target=lambda: reports.append(
        preprocess(slides, job, CONFIG, executor=RayExecutor(max_retries=max_retries))))
    run.start()
    try:
        _kill_worker_of(job, "b", run)
    finally:
        run.join(timeout=120)
    (report,) = reports
    b = next(r for r in report.results if r.slide_id == "b")
    assert b.status == expected
    assert _statuses(job)["b"]["status"] == expected
    _assert_nothing_half_written(job)
    if expected == "ok":  # retried from scratch by Ray
        _assert_same_features(job, local_job, "b")
    else:  # retries spent: the driver records the slide, which the next run redoes
        assert "Ray task lost" in b.error
        assert json.loads((job / "manifest.json").read_text())["counts"]["failed"] == 2
        assert not (job / "features" / "handcrafted" / "b.h5").exists()


def test_clear_errors(monkeypatch):
    with pytest.raises(UsageError, match="--address applies to --executor ray"):
        make_executor("local", "head:6379")
    with pytest.raises(UsageError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RayExecutor("127.0.0.1:1").start(Path("job"), CONFIG, None)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UsageError, match=r"pip install 'slidevl\[ray\]'"):
        make_executor("ray")


def test_interrupt_cancels_tasks_and_marks_slides_interrupted(local_ray, slides, tmp_path):
    # What Ctrl-C does to preprocess's loop: the executor's run is closed mid-way.
    job = tmp_path / "job"
    executor = RayExecutor()
    executor.start(job, CONFIG, None)
    results = executor.run([slides / "a.svs", slides / "b.svs"], progress=None)  # Ray shows no tile progress
    assert next(results).slide_id == "a"
    status = job / "status" / "handcrafted" / "b.json"
    deadline = time.monotonic() + 60
    while not (status.is_file() and json.loads(status.read_text())["status"] == "running"):
        assert time.monotonic() < deadline, "b never started"
        time.sleep(0.01)
    results.close()
    assert _statuses(job)["b"]["status"] == "interrupted"
    _assert_nothing_half_written(job)


def test_gpu_tasks_request_a_gpu_and_keep_their_readers():
    from slidevl.features.executors import _task_config

    gpu = RayExecutor()
    gpu._config = PreprocessConfig(device="cuda:1", workers=3)
    assert gpu._task_options() == {"num_gpus": 1, "num_cpus": 4}
    # Ray shows a task only its own GPU, as cuda:0
    assert (_task_config(gpu._config).device, _task_config(gpu._config).workers) == ("cuda", 3)
    cpu = RayExecutor()
    cpu._config = CONFIG
    assert cpu._task_options() == {"num_cpus": 1}
    assert _task_config(CONFIG).workers == 0  # Ray's CPU count is what runs
