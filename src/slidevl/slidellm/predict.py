"""Answer a file of VQA records with a tuned checkpoint, for ``slidevl vqa eval``.

The records are answered exactly as in training (single turn, the record's question and
options, its bbox for region questions), greedily, in batches; the visual tokens of each
slide are computed once and cached next to its features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from slidevl.slidellm.ask import DEFAULT_ASK_JOB, SlideAssistant
from slidevl.vqa.predictions import write_predictions
from slidevl.vqa.records import read_records


@dataclass(frozen=True)
class PredictionRun:
    """Where the answers went and how long they took."""

    path: Path
    n_records: int
    seconds_per_answer: float


def predict_records(
    checkpoint: str | Path | SlideAssistant,
    records: str | Path,
    out: str | Path,
    *,
    job: str | Path | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    cache_root: str | Path = DEFAULT_ASK_JOB,
    console: Console | None = None,
    rank_single: bool = False,
) -> PredictionRun:
    """Answer every record of ``records`` (JSONL) and write ``{"id", "answer"}`` lines to ``out``.

    ``checkpoint`` is a tuned checkpoint folder or an already loaded assistant (whose own
    cache root then applies). ``job`` holds the features of the records' slides; by
    default the checkpoint's own training job. ``rank_single`` answers single-choice records
    with the most likely option (:meth:`SlideAssistant.rank_options`). Nothing is written
    until every record has its answer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    console = console or Console(stderr=True)
    items = read_records(records)
    if not items:
        raise ValueError(f"{records}: no VQA records to answer")
    assistant = checkpoint if isinstance(checkpoint, SlideAssistant) else SlideAssistant(checkpoint, cache_root=cache_root)
    slides = sorted({r.slide for r in items})
    visuals = {s: assistant.open_slide(s, job=job, console=console) for s in slides}
    answers: list[str] = []
    started = time.perf_counter()
    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("answering", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            answers += assistant.answer_records(chunk, visuals, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                rank_single=rank_single)
            progress.advance(task, len(chunk))
    seconds = (time.perf_counter() - started) / len(items)
    path = write_predictions(out, [(r.id, a) for r, a in zip(items, answers)])
    return PredictionRun(path=path, n_records=len(items), seconds_per_answer=seconds)
