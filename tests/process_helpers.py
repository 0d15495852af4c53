"""Helpers for tests that run slidevl in a real subprocess and stop it mid-run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_until_running(job: Path, slide_id: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once ``slide_id``'s status in ``job`` says running; fail if the process ends first."""
    status = job / "status" / "handcrafted" / f"{slide_id}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "preprocess finished before it could be stopped"
        try:
            if json.loads(status.read_text())["status"] == "running":
                return
        except (OSError, ValueError):  # not written yet, or caught mid-rename
            pass
        time.sleep(0.01)
    raise AssertionError(f"{slide_id} never started")
