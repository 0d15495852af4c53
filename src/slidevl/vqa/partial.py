"""Predictions written as they are made, so a stopped ``vqa predict`` resumes where it stopped.

While a run is going, answers are appended to ``<out>.partial`` (JSONL, one
``{"id", "answer"}`` per line after a header line holding the run's settings), flushed
and fsynced after every batch: a Ctrl-C, SIGTERM or kill loses at most the batch in
flight. When every record is answered, the predictions are written to ``<out>`` in record
order through an atomic rename and the partial file is removed, so ``<out>`` exists only
when it is complete.

Rerunning the same command continues from the partial file; a finished ``<out>`` is not
replaced unless the run asks for ``overwrite``. A partial file made with other settings
or for other records is refused, naming the fix, rather than mixed into the new answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from slidevl.vqa.predictions import PredictionError, read_predictions, write_predictions

HEADER_KEY = "slidevl_predict"


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where the answers of an unfinished run of ``out`` are kept."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def count_answered(out: str | os.PathLike[str]) -> int:
    """Answers saved so far for ``out`` (all of them once ``out`` is finished); for progress lines."""
    out = Path(out)
    if out.is_file() and not partial_path(out).is_file():
        return sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
    return len(_read(partial_path(out))[1]) if partial_path(out).is_file() else 0


class PartialPredictions:
    """The answers of one prediction run, appended as they come (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str], record_ids: Sequence[str], settings: dict[str, Any], *,
                 overwrite: bool = False, resume: bool = False) -> None:
        """Open the run of ``out``: start it, or continue the one a stopped run left.

        Raises :class:`PredictionError` when ``out`` is already finished (unless ``overwrite``
        or ``resume``), or when the partial file belongs to other settings or records.
        """
        if overwrite and resume:
            raise PredictionError("give --overwrite (answer every record again) or --resume, not both")
        self.out = Path(out)
        self.path = partial_path(self.out)
        self.record_ids = list(record_ids)
        self.settings = json.loads(json.dumps(settings))  # as the header stores it
        self.answers: dict[str, str] = {}
        self.finished = False
        if overwrite:
            self.path.unlink(missing_ok=True)
        elif self.out.is_file() and not self.path.exists():
            if not resume:
                raise PredictionError(
                    f"{self.out} already holds finished predictions; pass --overwrite to answer every record again, "
                    "or choose another --out"
                )
            self._adopt_finished()
            return
        if self.path.is_file():
            self._load()

    def _adopt_finished(self) -> None:
        """Resume a finished run: nothing is left to answer, if it answered exactly these records."""
        answers = read_predictions(self.out)
        if set(answers) != set(self.record_ids):
            raise PredictionError(
                f"{self.out} holds finished predictions for other records ({len(answers)} answers, {len(self.record_ids)} "
                "records given); pass --overwrite to answer these records, or choose another --out"
            )
        self.answers = answers
        self.finished = True

    @property
    def todo(self) -> list[str]:
        """Ids not answered yet, in record order."""
        return [i for i in self.record_ids if i not in self.answers]

    def _load(self) -> None:
        header, answers, good_bytes = _read(self.path)
        if header != self.settings:
            raise PredictionError(
                f"{self.path} was left by a run with other settings ({_diff(header, self.settings)}); pass --overwrite "
                "to start again with these, or rerun with the earlier settings to finish that run"
            )
        extra = sorted(set(answers) - set(self.record_ids))
        if extra:
            raise PredictionError(
                f"{self.path} holds answers to {len(extra)} id(s) that are not in these records (e.g. {extra[0]!r}); "
                "pass --overwrite to start again, or give the records the run was started with"
            )
        # A kill can leave half a line at the end: drop it so appends start on a clean line.
        if good_bytes < self.path.stat().st_size:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)
        self.answers = answers

    def append(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Save answers now (flushed and fsynced), so an interrupt cannot lose them."""
        pairs = list(pairs)
        # Created with the first answers, so a run that fails before answering leaves nothing behind.
        fresh = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            if fresh:
                fh.write(json.dumps({HEADER_KEY: self.settings}) + "\n")
            for pid, answer in pairs:
                fh.write(json.dumps({"id": pid, "answer": answer}, ensure_ascii=False) + "\n")
            _sync(fh)
        self.answers.update(pairs)

    def finish(self) -> Path:
        """Write ``out`` in record order (atomically) and drop the partial file; every record must be answered."""
        if self.finished:
            return self.out
        missing = self.todo
        if missing:
            raise PredictionError(f"{self.path}: {len(missing)} record(s) still unanswered (e.g. {missing[0]!r})")
        write_predictions(self.out, [(i, self.answers[i]) for i in self.record_ids])
        self.path.unlink(missing_ok=True)
        self.finished = True
        return self.out


def _read(path: Path) -> tuple[Any, dict[str, str], int]:
    """Header, answers, and the byte length of the complete lines of a partial file."""
    header: Any = None
    answers: dict[str, str] = {}
    good = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                obj = json.loads(raw)
            except ValueError:
                raise PredictionError(
                    f"{path}:{lineno}: not a line this tool wrote; delete the file or pass --overwrite"
                ) from None
            if lineno == 1:
                if not isinstance(obj, dict) or HEADER_KEY not in obj:
                    raise PredictionError(f"{path}: no header line; delete the file or pass --overwrite")
                header = obj[HEADER_KEY]
            else:
                answers[obj["id"]] = obj["answer"]
            good += len(raw)
    return header, answers, good


def _diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "unreadable header"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
