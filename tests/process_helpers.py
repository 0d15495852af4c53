"""Helpers for tests that run slidevl in a real subprocess and stop it mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def own_group(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``command`` running in a process group of its own, killed whole at the end if still alive.

    Its own group lets :func:`interrupt` signal it and its workers, as a terminal's Ctrl-C does.
    """
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def interrupt(proc: subprocess.Popen, signum: int = signal.SIGINT, timeout: float = 60.0) -> tuple[str, str]:
    """Send ``signum`` to ``proc``'s whole group and wait for it to end: its (stdout, stderr)."""
    os.killpg(proc.pid, signum)
    return proc.communicate(timeout=timeout)


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


def _ignores_sigint(pid: str) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # ended meanwhile
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def wait_until_reading(job: Path, slide_id: str, proc: subprocess.Popen, workers: int, timeout: float = 60.0) -> None:
    """Return once ``slide_id`` is running and all ``workers`` tile readers of ``proc`` are up.

    A reader is up once it ignores SIGINT (its ``worker_init_fn`` has run), so a signal sent
    now lands inside the slide's tile reading, with the workers running, however loaded the
    machine is; a fixed sleep after "running" could land after the slide had finished.
    """
    wait_until_running(job, slide_id, proc, timeout)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"preprocess finished before {slide_id}'s tile readers were seen"
        pids = children.read_text().split()
        if len(pids) >= workers and all(_ignores_sigint(pid) for pid in pids):
            return
        time.sleep(0.005)
    raise AssertionError(f"{slide_id}'s tile readers never started")
