"""Killing `preprocess` mid-slide and re-running gives the same store as a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from process_helpers import wait_until_reading
from slide_fixtures import write_aperio_slide
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore

CONFIG = PreprocessConfig(workers=1, batch_size=8, progress=False)
RUNNER = "from slidevl.features.cli import app; app()"


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_kill_mid_slide_then_rerun_matches_clean_run(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_slide(slides / "a.svs", 2048, 1536)
    write_aperio_slide(slides / "b.svs", 6144, 4608, seed=5)
    job = tmp_path / "killed"
    command = [sys.executable, "-c", RUNNER, "preprocess", str(slides), "--out", str(job), "--workers", "1",
               "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_reading(job, "b", proc, workers=1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its DataLoader workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = FeatureStore(job, "handcrafted")
    assert store.path("a").is_file() and not store.path("b").is_file()
    assert json.loads((job / "status" / "handcrafted" / "b.json").read_text())["status"] == "running"

    resumed = preprocess(slides, job, CONFIG)
    assert [(r.slide_id, r.status) for r in resumed.results] == [("a", "skipped"), ("b", "ok")]
    clean = tmp_path / "clean"
    assert preprocess(slides, clean, CONFIG).exit_code == 0

    for sid in ("a", "b"):
        got, want = _datasets(store.path(sid)), _datasets(FeatureStore(clean, "handcrafted").path(sid))
        assert sorted(got) == sorted(want)
        for name in want:
            assert np.array_equal(got[name], want[name]), f"{sid}:{name}"
        got_attrs, want_attrs = store.load(sid).attrs, FeatureStore(clean).load(sid).attrs
        for attrs in (got_attrs, want_attrs):
            attrs.pop("created")
        assert got_attrs == want_attrs
        for extra in (f"tissue/handcrafted/{sid}.geojson", f"qc/handcrafted/{sid}.png"):
            assert (job / extra).read_bytes() == (clean / extra).read_bytes(), extra
    assert not list(job.rglob("*.partial"))
    manifest = json.loads((job / "manifest.json").read_text())
    assert {e["slide_id"]: e["status"] for e in manifest["slides"]} == {"a": "skipped", "b": "ok"}
