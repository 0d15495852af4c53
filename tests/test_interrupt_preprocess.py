"""Ctrl-C on `slidevl preprocess`: one line, nothing left "running", a manifest, and the rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from process_helpers import interrupt, own_group, wait_until_reading
from slide_fixtures import write_aperio_slide
from slidevl.features.store import FeatureStore

RUNNER = "from slidevl.features.cli import app; app()"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_slide_says_so_marks_the_slide_and_resumes(tmp_path: Path, signum: int) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_slide(slides / "a.svs", 2048, 1536)
    write_aperio_slide(slides / "b.svs", 8192, 6144, seed=5)
    (slides / "notes.txt").write_text("not a slide")
    job = tmp_path / "job"
    command = [sys.executable, "-c", RUNNER, "preprocess", str(slides), "--out", str(job), "--workers", "2",
               "--batch-size", "8", "--no-progress"]
    env = {**os.environ, "COLUMNS": "240"}
    with own_group(command, env) as proc:
        wait_until_reading(job, "b", proc, workers=2)
        out, err = interrupt(proc, signum)  # to the whole group, workers included
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert "Traceback" not in err + out, err + out
    lines = [line for line in (err + out).splitlines() if "interrupted" in line]
    assert lines == [f"interrupted: 1 slide(s) complete, 1 interrupted ({job / 'manifest.json'}); "
                     "rerun the same command to resume"], err + out
    assert "skipped 1 file(s) that are not slides: notes.txt" in out
    status = json.loads((job / "status" / "handcrafted" / "b.json").read_text())
    assert status["status"] == "interrupted"
    manifest = json.loads((job / "manifest.json").read_text())
    assert {e["slide_id"]: e["status"] for e in manifest["slides"]} == {"a": "ok", "b": "interrupted"}
    assert manifest["latest_encoder"] == "handcrafted"
    assert "interrupted" in (job / "summary.md").read_text()
    assert not list(job.rglob("*.partial"))

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 ok, 1 skipped" in rerun.stdout
    manifest = json.loads((job / "manifest.json").read_text())
    assert {e["slide_id"]: e["status"] for e in manifest["slides"]} == {"a": "skipped", "b": "ok"}
    assert FeatureStore(job, "handcrafted").path("b").is_file()


def test_entries_that_are_not_slides_are_named_once_hidden_ones_are_not(tmp_path: Path) -> None:
    from slidevl.features.jobs import find_inputs, not_slides_note

    for name in ("a.svs", "b.TIFF", ".DS_Store", *(f"f{i}.csv" for i in range(7))):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    slides, others = find_inputs(tmp_path)
    assert [p.name for p in slides] == ["a.svs", "b.TIFF"]
    assert not_slides_note(others) == ("skipped 7 file(s) and 1 folder(s) that are not slides: "
                                       "f0.csv, f1.csv, f2.csv, f3.csv, f4.csv … (3 more)")
    assert find_inputs(tmp_path / "a.svs")[1] == [] and not_slides_note([]) is None


def test_the_interrupted_line_counts_only_the_interrupted_encoders_slides(tmp_path: Path) -> None:
    from slidevl.features.cli import _finished

    rows = [{"slide_id": sid, "encoder_folder": folder, "status": status}
            for sid, folder, status in [("a", "handcrafted", "ok"), ("b", "handcrafted", "ok"), ("c", "handcrafted", "failed"),
                                        ("a", "uni", "ok"), ("b", "uni", "interrupted")]]
    (tmp_path / "manifest.json").write_text(json.dumps({"latest_encoder": "uni", "slides": rows}))
    assert _finished(tmp_path) == f"1 slide(s) complete, 1 interrupted ({tmp_path / 'manifest.json'})"
    # A manifest written before the latest encoder was recorded counts every row, as it did.
    (tmp_path / "manifest.json").write_text(json.dumps({"slides": rows}))
    assert _finished(tmp_path).startswith("3 slide(s) complete, 1 failed, 1 interrupted")


STALLED_READ = """
import sys, time
import typer
from torch.utils.data import Dataset
from slidevl.features.tiles import iterate_items
from slidevl.interrupts import resumable

class Stalled(Dataset):
    # Item 0 comes back at once; item 1 stands for a read that hangs (a stalled network mount).
    def __len__(self): return 4
    def __getitem__(self, i):
        if i > 0:
            time.sleep(300)
        return {"i": i}
    def close(self): pass

try:
    with resumable(lambda: "nothing finished"):
        for item in iterate_items(Stalled(), workers=1):
            print("got", item["i"], flush=True)
except typer.Exit as stop:  # what the CLI's app does with it
    sys.exit(stop.exit_code)
"""


def test_ctrl_c_does_not_wait_for_a_worker_stuck_in_a_read() -> None:
    # The worker ignores the group's SIGINT (ignore_interrupts), so only stop_workers can end it
    # before its 300-s read returns: without it the interpreter's exit waits for the worker.
    with own_group([sys.executable, "-c", STALLED_READ]) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "got 0\n"
        out, err = interrupt(proc, timeout=90)
    assert proc.returncode == 130, err
    assert "interrupted: nothing finished; rerun the same command to resume" in err
    assert "Traceback" not in err + out, err + out
