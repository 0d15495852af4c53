"""`slidevl --threads N` sets torch's CPU threads for any command, and for the processes it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from slidevl.cli import app
from slidevl.cpus import THREAD_VARIABLES

runner = CliRunner()


def test_threads_reach_torch_and_child_processes() -> None:
    code = (
        "import os, sys\n"
        "from slidevl.cli import app\n"
        "try:\n"
        "    app(['--threads', '3', 'synth', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import torch\n"
        "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["3", "3"]


def test_threads_reach_a_torch_already_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    for key in THREAD_VARIABLES:
        monkeypatch.delenv(key, raising=False)  # restored after the test
    try:
        result = runner.invoke(app, ["--threads", "1", "synth", "--help"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive_or_zero() -> None:
    result = runner.invoke(app, ["--threads", "-1", "synth", "--help"])
    assert result.exit_code == 2 and "--threads" in result.output
