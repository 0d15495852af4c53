"""Ctrl-C on `slidevl vqa predict`: one line, answers saved so far kept, and the rerun continues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from process_helpers import interrupt, own_group
from slidevl.qa.records import read_records, write_records
from slidevl.vqa.cli import app
from slidevl.vqa.partial import partial_path
from slidevl.vqa.predictions import read_predictions
from test_slidellm_fixtures import world  # noqa: F401  (fixture used by name)
from test_vqa_predict import checkpoint  # noqa: F401  (fixture used by name)

RUNNER = "from slidevl.vqa.cli import app; app()"
runner = CliRunner()


@pytest.fixture()
def many_records(world: dict[str, Path], tmp_path: Path) -> Path:  # noqa: F811
    """The world's records six times over: enough answers to stop a run in the middle."""
    base = read_records(world["records"])
    return write_records(tmp_path / "many.jsonl", [replace(r, id=f"{r.id}-{i}") for i in range(6) for r in base])


def _answered(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)  # minus the header line
    except OSError:
        return 0


def test_sigint_mid_run_keeps_the_answers_and_the_rerun_continues(checkpoint: Path, many_records: Path,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "pred.jsonl"
    command = [sys.executable, "-c", RUNNER, "predict", "--checkpoint", str(checkpoint), "--records", str(many_records),
               "--out", str(out), "--max-new-tokens", "12", "--batch-size", "1"]
    env = {**os.environ, "COLUMNS": "240"}
    with own_group(command, env) as proc:
        deadline = time.monotonic() + 120
        while _answered(partial_path(out)) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no answer was saved"
            time.sleep(0.02)
        stdout, stderr = interrupt(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout, stderr
    assert "loading checkpoint" in stderr and "answering 60 record(s)" in stderr  # progress without a terminal
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    saved = _answered(partial_path(out))
    assert lines == [f"interrupted: {saved} record(s) answered, saved in {partial_path(out)}; "
                     "rerun the same command to resume"], stderr
    assert not out.exists() and 3 <= saved < 60
    kept = [json.loads(line) for line in partial_path(out).read_text().splitlines()[1:]]

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {saved} of 60 records already answered" in rerun.stderr
    assert "60 answers" in rerun.stdout and f"{saved} of them from an earlier run" in rerun.stdout
    answers = read_predictions(out)
    assert list(answers) == [r.id for r in read_records(many_records)]
    assert all(answers[k["id"]] == k["answer"] for k in kept)
    assert not partial_path(out).exists()


def test_finished_output_is_refused_unless_overwrite_and_a_foreign_partial_is_refused(
        world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "pred.jsonl"
    args = ["predict", "--checkpoint", str(checkpoint), "--records", str(world["records"]), "--out", str(out),
            "--max-new-tokens", "2"]
    assert runner.invoke(app, args).exit_code == 0
    first = out.read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and f"{out} already holds finished predictions; pass --overwrite" in again.output
    done = runner.invoke(app, [*args, "--resume"])
    n = len(read_records(world["records"]))
    assert done.exit_code == 0 and out.read_text() == first
    assert f"{n} of them from an earlier run" in done.stdout, "a finished run is not answered again"
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(world["records"].read_text().splitlines(keepends=True)[:2]))
    foreign = runner.invoke(app, [*args[:4], str(fewer), *args[5:], "--resume"])
    assert foreign.exit_code == 2 and "finished predictions for other records" in foreign.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0 and out.read_text() == first
    both = runner.invoke(app, [*args, "--overwrite", "--resume"])
    assert both.exit_code == 2 and "not both" in both.output

    # A stopped run with other settings is not mixed into this one; a torn last line is dropped.
    out.unlink()
    header = {"slidevl_predict": {"checkpoint": str(checkpoint.resolve()), "job": None, "max_new_tokens": 99,
                                  "rank_single": True}}
    partial_path(out).write_text(json.dumps(header) + "\n" + '{"id": "S1-cap", "answer": "x"}\n{"id": "S1')
    other = runner.invoke(app, args)
    assert other.exit_code == 2 and "max_new_tokens: 99 then, 2 now" in other.output and "--overwrite" in other.output
    header["slidevl_predict"]["max_new_tokens"] = 2
    partial_path(out).write_text(json.dumps(header) + "\n" + '{"id": "S1-cap", "answer": "kept"}\n{"id": "S1')
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert read_predictions(out)["S1-cap"] == "kept"
