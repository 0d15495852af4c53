"""Answer a file of VQA records with a tuned checkpoint, for ``slidevl vqa eval``.

The records are answered exactly as in training (single turn, the record's question and
options, its bbox for region questions), greedily, in batches; the visual tokens of each
slide are computed once and cached next to its features. Each batch's answers are saved
as soon as they exist (:mod:`slidevl.vqa.partial`), so a stopped run resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slidevl.errors import InputError
from slidevl.qa.records import VQARecord, read_records
from slidevl.slidellm.ask import DEFAULT_ASK_JOB, SlideAssistant
from slidevl.vqa.partial import PartialPredictions


@dataclass(frozen=True)
class PredictionRun:
    """Where the answers went and how long they took."""

    path: Path
    n_records: int
    seconds_per_answer: float
    n_resumed: int = 0  # answers a stopped earlier run had already saved


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
    rank_single: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> PredictionRun:
    """Answer every record of ``records`` (JSONL) and write ``{"id", "answer"}`` lines to ``out``.

    ``checkpoint`` is a tuned checkpoint folder or an already loaded assistant (whose own
    cache root then applies). ``job`` holds the features of the records' slides; by
    default the checkpoint's own training job. ``rank_single`` (on by default: part of the best
    measured recipe, ``recipes/vqa.yaml``) answers single-choice records with the most likely
    option (:meth:`SlideAssistant.rank_options`).

    Answers are saved after every batch (:mod:`slidevl.vqa.partial`): a stopped run is
    continued by the same call, and ``out`` appears, atomically, only once every record
    has its answer. A finished ``out`` is refused unless ``overwrite`` (answer again) or
    ``resume`` (nothing left to do).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    console = console or Console(stderr=True)
    items = read_records(records)  # refuses a file without records
    source = checkpoint.loaded.directory if isinstance(checkpoint, SlideAssistant) else checkpoint
    settings = {"checkpoint": str(Path(source).resolve()), "job": str(Path(job).resolve()) if job else None,
                "max_new_tokens": max_new_tokens, "rank_single": rank_single}
    saved = PartialPredictions(out, [r.id for r in items], settings, overwrite=overwrite, resume=resume)
    resumed = len(saved.answers)
    todo_ids = set(saved.todo)
    todo = [r for r in items if r.id in todo_ids]
    if resumed and todo:
        console.print(f"resuming: {resumed} of {len(items)} records already answered in {saved.path}", highlight=False)
    started = time.perf_counter()
    if todo:
        _answer(checkpoint, todo, saved, job=job, max_new_tokens=max_new_tokens, batch_size=batch_size,
                cache_root=cache_root, console=console, rank_single=rank_single)
    elapsed = time.perf_counter() - started
    path = saved.finish()
    return PredictionRun(path=path, n_records=len(items), seconds_per_answer=elapsed / max(len(todo), 1),
                         n_resumed=len(items) - len(todo))


def _answer(checkpoint: str | Path | SlideAssistant, todo: list[VQARecord], saved: PartialPredictions, *, job: str | Path | None,
            max_new_tokens: int, batch_size: int, cache_root: str | Path, console: Console, rank_single: bool) -> None:
    """Load the model, encode the slides and answer ``todo`` batch by batch, saving each batch."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    # Without a terminal the bars stay silent, so each phase also gets a line: a long
    # checkpoint load or slide encoding is never a silent wait.
    plain = not console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=plain) as progress:
        if isinstance(checkpoint, SlideAssistant):
            assistant = checkpoint
        else:
            if plain:
                console.print(f"loading checkpoint {checkpoint}", highlight=False)
            loading = progress.add_task(f"loading {checkpoint}", total=None)
            t = time.perf_counter()
            assistant = SlideAssistant(checkpoint, cache_root=cache_root)
            progress.remove_task(loading)
            console.print(f"checkpoint loaded in {time.perf_counter() - t:.1f} s", highlight=False)
        slides = sorted({r.slide for r in todo})
        if plain:
            console.print(f"visual tokens of {len(slides)} slide(s)", highlight=False)
        encoding = progress.add_task("visual tokens", total=len(slides))
        visuals = {}
        for slide in slides:
            visuals[slide] = assistant.open_slide(slide, job=job, console=console)
            progress.advance(encoding)
        progress.remove_task(encoding)
        if plain:
            console.print(f"answering {len(todo)} record(s)", highlight=False)
        answering = progress.add_task("answering", total=len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = assistant.answer_records(chunk, visuals, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                               rank_single=rank_single)
            saved.append((r.id, a) for r, a in zip(chunk, answers))
            progress.advance(answering, len(chunk))
