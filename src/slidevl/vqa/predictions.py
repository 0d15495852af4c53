"""Model predictions for a VQA record file: JSONL lines ``{"id": ..., "answer": ...}``.

Other keys on a line (model name, latency, raw output) are kept out of scoring
and ignored. Every gold id needs exactly one prediction and every prediction a
gold id: a mismatch is an error that names the file and the ids, never a silent
partial score.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from slidevl.atomic import atomic_path
from slidevl.errors import InputError
from slidevl.qa.records import VQARecord

# How many ids an error message lists before it only counts them.
_SHOWN_IDS = 5


class PredictionError(InputError):
    """A prediction file is malformed or does not match its gold records."""


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``{"id", "answer"}`` JSONL into ``{id: answer}``; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"{path}: prediction file not found")
    answers: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PredictionError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise PredictionError(f"{where}: expected an object {{\"id\": ..., \"answer\": ...}}")
            for key in ("id", "answer"):
                if key not in obj:
                    raise PredictionError(f"{where}: field {key!r} is missing")
                if not isinstance(obj[key], str):
                    raise PredictionError(
                        f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}"
                    )
            pid = obj["id"]
            if pid in first_line:
                raise PredictionError(f"{where}: duplicate id {pid!r} (first on line {first_line[pid]})")
            first_line[pid] = lineno
            answers[pid] = obj["answer"]
    return answers


def write_predictions(path: str | os.PathLike[str], answers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Path:
    """Write ``{id: answer}`` (or ``(id, answer)`` pairs) as prediction JSONL, atomically."""
    items = list(answers.items()) if isinstance(answers, Mapping) else list(answers)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for pid, answer in items:
            fh.write(json.dumps({"id": pid, "answer": answer}, ensure_ascii=False) + "\n")
    return path


def match_predictions(
    gold: Sequence[VQARecord],
    predictions: Mapping[str, str],
    pred_path: str | os.PathLike[str],
    gold_path: str | os.PathLike[str],
) -> list[str]:
    """Answers aligned with ``gold``; raises naming missing and extra ids."""
    gold_ids = [r.id for r in gold]
    gold_set = set(gold_ids)
    missing = [i for i in gold_ids if i not in predictions]
    extra = [i for i in predictions if i not in gold_set]
    problems = []
    if missing:
        problems.append(f"{len(missing)} gold id(s) from {gold_path} have no prediction: {_show(missing)}")
    if extra:
        problems.append(f"{len(extra)} predicted id(s) are not in {gold_path}: {_show(extra)}")
    if problems:
        raise PredictionError(f"{pred_path}: predictions do not match the gold records; " + "; ".join(problems))
    return [predictions[i] for i in gold_ids]


def _show(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return shown + (f", ... ({len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else "")
