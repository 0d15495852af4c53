"""Ctrl-C on `slidevl slidellm stage2`: one line naming the last checkpoint, and the same command continues."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from process_helpers import interrupt, own_group
from test_slidellm_fixtures import world  # noqa: F401  (fixture used by name)

from slidevl.slidellm.tuning.state import load_state_entry


def test_sigint_mid_stage2_names_the_checkpoint_and_the_same_command_resumes(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "s2"
    trainer = out / "checkpoint" / "trainer"
    command = [sys.executable, "-m", "slidevl", "slidellm", "stage2", "--records", str(world["records"]),
               "--job", str(world["job"]), "--encoder", str(world["encoder"]), "--llm", str(world["llm"]),
               "--out", str(out), "--connector", "qformer", "--epochs", "8", "--batch-size", "1", "--save-every", "1", "--lora-r", "4",
               "--lora-alpha", "8", "--queries", "4", "--qformer-layers", "1", "--qformer-hidden", "32",
               "--qformer-heads", "4", "--qformer-ffn", "64", "--max-tokens", "256", "--cpu"]
    env = {**os.environ, "COLUMNS": "240", "OMP_NUM_THREADS": "1"}

    def saved_step() -> int:
        try:
            return load_state_entry(trainer, "trainer", "counters")["step"]
        except Exception:  # not written yet, or replaced while read
            return 0

    with own_group(command, env) as proc:
        deadline = time.monotonic() + 240
        while saved_step() < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        _, stderr = interrupt(proc, timeout=120)  # what Ctrl-C in a terminal does
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    step = saved_step()
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted: step {step} (epoch {(step - 1) // 6 + 1}) is checkpointed in {out / 'checkpoint'}; "
                     "rerun the same command to resume"], stderr
    assert 2 <= step < 48 and not (out / "summary.json").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: step {step} (" in rerun.stderr and "stage2: 48 steps" in rerun.stdout
    history = load_state_entry(trainer, "trainer", "history")
    assert [h[0] for h in history] == list(range(1, 49)), "every step once: none repeated, none skipped"
