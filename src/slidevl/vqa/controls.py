"""Does a slide VQA model look at the slide? Blind baselines and a shuffled-visuals control.

A model that reads the image scores well above answers that never look at it, and falls
back towards them when every question is asked with *another* slide's visual input:

* :func:`blind_single_choice`: chance and train-majority accuracy on the single-choice
  test questions (:func:`slidevl.vqa.build_summary.blind_baselines` on those records);
* :func:`lending_slides`: which slide lends its visual input to which;
* :func:`answer_with_other_slides`: every record answered with its lender's whole-slide
  visual input, the question text unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slidevl.errors import InputError
from slidevl.qa.records import VQARecord
from slidevl.vqa.build_summary import blind_baselines

if TYPE_CHECKING:  # keeps this module free of torch until a model is used
    from slidevl.slidellm.ask import SlideAssistant


def blind_single_choice(train: Sequence[VQARecord], test: Sequence[VQARecord]) -> dict[str, Any]:
    """Chance and train-majority accuracy of the single-choice ``test`` records.

    ``chance`` is the mean of 1/options; ``majority`` answers each question with the option
    text most often correct for its template in ``train``. Keys: ``n``, ``chance``, ``majority``.
    """
    single = blind_baselines([r for r in train if r.format == "single"], [r for r in test if r.format == "single"])
    if not single["n_test_choice"]:
        raise InputError("no single-choice test records: the blind baselines need some")
    return {"n": single["n_test_choice"], "chance": single["chance"], "majority": single["majority_text"]}


def lending_slides(slides: Sequence[str]) -> dict[str, str]:
    """Each slide → the slide half the sorted list away, whose visual input it borrows.

    Half the list away rather than the next one: a patient's slides sort side by side, and
    a slide of the same patient would share its grade and much of its tissue.
    """
    ordered = sorted(set(slides))
    if len(ordered) < 2:
        raise InputError(f"the shuffled-visuals control needs at least 2 slides, got {len(ordered)}")
    shift = len(ordered) // 2
    return {s: ordered[(i + shift) % len(ordered)] for i, s in enumerate(ordered)}


def answer_with_other_slides(
    assistant: "SlideAssistant",
    records: Sequence[VQARecord],
    *,
    job: str | Path | None = None,
    rank_single: bool = True,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    console: Console | None = None,
) -> list[str]:
    """Answers to ``records``, each asked with the whole-slide visual input of its lending slide.

    Answered as :func:`slidevl.vqa.predict.predict_records` answers (``rank_single`` ranks the
    options of single-choice records). A region of one slide means nothing on another, so
    region and patch questions are asked of the whole lent slide.
    """
    console = console or Console(stderr=True)
    lender = lending_slides([r.slide for r in records])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        # Each lent visual input is computed once, under the slide that lends it.
        lent = {s: assistant.open_slide(s, job=job) for s in progress.track(sorted(set(lender.values())),
                                                                              description="visual tokens")}
        visuals = {s: lent[lender[s]] for s in lender}
        asked = [replace(r, bbox=None) for r in records]
        answering = progress.add_task("answering with other slides", total=len(asked))
        answers: list[str] = []
        for start in range(0, len(asked), batch_size):
            chunk = asked[start : start + batch_size]
            answers += assistant.answer_records(chunk, visuals, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                rank_single=rank_single)
            progress.advance(answering, len(chunk))
    return answers
