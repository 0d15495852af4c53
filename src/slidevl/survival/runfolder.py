"""A cross-validation run folder that never mixes two runs, and resumes after an interrupt.

A run writes ``summary.json``, ``oof_risks.csv``, ``km.png``, ``splits/`` (generated
folds), ``fold_<k>/`` (checkpoint, then ``result.json`` once the fold is finished),
``evidence/`` and ``run_state.json``. The state file records the run's identity (its
options, the clinical table's checksum and the folds), which folds are finished and a
status: ``running``, ``interrupted``, ``failed`` or ``finished``.

Into an existing folder:

* an unfinished run (any status but ``finished``) resumes from its finished folds when
  the identity matches, with or without ``--resume``: so the command that was
  interrupted, run again, continues; a different identity is refused, naming what differs;
* a finished run is refused unless ``--overwrite``; ``--resume`` has nothing to do;
* any other non-empty folder is refused unless ``--overwrite``.

``--overwrite`` removes what a run writes (the names above) and nothing else, so a
user's own files in the folder survive and nothing of the earlier run does.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidevl.atomic import write_json_atomic
from slidevl.errors import ConfigError

STATE_FILE = "run_state.json"
RESULT_FILE = "result.json"
RUN_FILES = ("summary.json", "oof_risks.csv", "km.png", STATE_FILE)
RUN_DIRS = ("evidence", "splits")
_FOLD_DIR = re.compile(r"^fold_\d+$")
_PARTIAL = re.compile(r"^\..+\.partial$")  # temporary files of atomic writes cut short


class RunFolderError(ConfigError):
    """The run folder holds another run or other files; the message says which option resolves it."""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise RunFolderError(f"{path}: unreadable run state ({exc}); pass --overwrite to start the run again") from exc


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            shown = "changed" if isinstance(a, list) or isinstance(b, list) else f"{a!r} → {b!r}"
            out.append(f"{prefix}{key} ({shown})")
    return out


def _run_outputs(out: Path, keep: Path | None) -> list[Path]:
    """The entries of ``out`` that a run writes; ``keep`` (the run's own --splits folder) is never one."""
    found = []
    for entry in out.iterdir():
        name = entry.name
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        if (name in RUN_FILES or _PARTIAL.match(name)) and entry.is_file():
            found.append(entry)
        elif (name in RUN_DIRS or _FOLD_DIR.match(name)) and entry.is_dir():
            found.append(entry)
    return found


def describe_progress(out: Path) -> str:
    """``"2 of 5 folds finished in RUN"`` from the state on disk, for the interrupt line."""
    try:
        state = _read_state(Path(out))
    except RunFolderError:
        state = None
    if state is None:
        return "no fold finished"
    return f"{len(state.get('finished', []))} of {state.get('n_folds', '?')} folds finished in {out}"


@dataclass
class RunFolder:
    """The run folder of one cross-validation run, opened after its input was checked."""

    out: Path
    identity: dict[str, Any]
    n_folds: int
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)  # fold index → result.json
    already_finished: bool = False  # a finished run with the same identity, opened with --resume

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any], n_folds: int, *, overwrite: bool = False, resume: bool = False,
             keep: Path | None = None, clean: bool = True) -> RunFolder:
        """Decide between a fresh start, a resume and a refusal; on ``overwrite``, remove the earlier run's outputs.

        ``clean=False`` takes the same decision without removing anything (the other
        processes of a multi-process run, while the main one cleans).
        """
        if overwrite and resume:
            raise RunFolderError("--overwrite and --resume exclude each other: --overwrite starts again, --resume continues")
        folder = cls(Path(out), identity, n_folds)
        out = folder.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is a file; pass a folder")
        if not out.is_dir() or not any(out.iterdir()):
            return folder
        if overwrite:
            for entry in _run_outputs(out, keep) if clean else []:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            return folder
        state = _read_state(out)
        if state is None:
            what = "another run's outputs (no run_state.json)" if _run_outputs(out, keep) else "other files"
            raise RunFolderError(f"{out} is not empty: it holds {what}; pass --overwrite to replace the run outputs "
                                 "(other files are kept) or choose another --out")
        differs = _differences(state.get("identity", {}), identity)
        if state.get("status") == "finished" and not resume:
            raise RunFolderError(f"{out} holds a finished run; pass --overwrite to run again in it, or choose another --out")
        if differs:
            raise RunFolderError(
                f"{out} holds {'a finished' if state.get('status') == 'finished' else 'an unfinished'} run with other settings "
                f"({'; '.join(differs[:8])}{' …' if len(differs) > 8 else ''}); rerun with its settings to resume it, "
                "pass --overwrite to start again, or choose another --out"
            )
        folder.already_finished = state.get("status") == "finished"
        for index in state.get("finished", []):
            result = out / f"fold_{index}" / RESULT_FILE
            if result.is_file():
                folder.finished[int(index)] = json.loads(result.read_text())
        return folder

    def _write_state(self, status: str, error: str | None = None) -> None:
        state = {"status": status, "n_folds": self.n_folds, "finished": sorted(self.finished), "identity": self.identity}
        if error is not None:
            state["error"] = error
        write_json_atomic(self.out / STATE_FILE, state)

    def start(self) -> None:
        self._write_state("running")

    def fold_finished(self, index: int, result: dict[str, Any]) -> None:
        """Record a finished fold: its result first, then the state that counts it."""
        write_json_atomic(self.out / f"fold_{index}" / RESULT_FILE, result)
        self.finished[index] = result
        self._write_state("running")

    def stopped(self, status: str, error: str | None = None) -> None:
        """``interrupted``, ``failed`` (with the error) or ``finished``."""
        self._write_state(status, error)
