"""Where the facts behind QA records come from: the :class:`FactsSource` protocol.

:func:`slidevl.vqa.build.build_qa` asks a source, per slide, for the facts of the whole
slide, of each ROI and of each field of view (:mod:`slidevl.vqa.templates_facts`), and
writes the same questions from them whatever the source:

* :class:`TruthFacts`: a synthetic cohort's ``truth.json`` and label maps (exact);
* :class:`slidevl.vqa.facts_llm.LLMFacts`: any job, by showing a vision-language model
  behind an OpenAI-compatible endpoint the slide, each ROI and each field (estimates).

What each source provides:

==========================  ==========================  ==============================
fact                        TruthFacts                  LLMFacts
==========================  ==========================  ==============================
composition (slide, ROI,    label map                   the model's percent estimates
field)
tumour grade                planted grade               the model's grade of the slide
nodule count (slide)        label map pieces            the model's count
nodule areas, spatial       label map                   not provided (``spatial`` is
layout (``spatial`` of a    (:mod:`slidevl.synth.       None)
slide or an ROI)            spatial`)
==========================  ==========================  ==============================

``spatial`` is optional in :class:`~slidevl.vqa.templates_facts.SlideFacts` and
:class:`~slidevl.vqa.templates_facts.RegionFacts`: without it the spatial questions
that need the layout (fragments, tumour at the tissue edge, necrosis inside or next
to tumour, part and size of the largest nodule, ROI nodule counts) are not asked, and
only the slide's nodule count is, from the count the source gives.

:func:`find_cohort` finds the synthetic cohort of a job when there is one, so a job made
from a synthetic cohort gets exact facts without naming the cohort.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from slidevl.errors import InputError
from slidevl.features.jobs import read_status, read_statuses
from slidevl.features.store import FeatureStore, SlideFeatures
from slidevl.vqa.roi import ROI, slide_mpp
from slidevl.vqa.templates_facts import RegionFacts, SlideFacts, WindowFacts, region_facts, slide_facts, window_facts
from slidevl.vqa.windows import Window

TRUTH_FILE = "truth.json"


class FactsError(InputError):
    """The facts of a cohort or job cannot be had; the message names the file and the fix."""


class FactsSource(Protocol):
    """What a QA build needs to know about the slides it asks questions about.

    ``region`` and ``window`` raise ``ValueError`` for a box whose facts cannot be had
    (no tissue there); the build then leaves that box out and reports why.
    """

    def describe(self) -> dict[str, Any]:
        """What the facts came from, for ``summary.json`` and the records' ``meta``."""
        ...

    def slide_ids(self) -> list[str]:
        """The slides to build QA for."""
        ...

    def patient_of(self, slide_id: str) -> str:
        """The patient of a slide (the train/test split is by patient)."""
        ...

    def patient_strata(self) -> dict[str, int]:
        """A label per patient to stratify the split by (the tumour grade; 0 for no tumour)."""
        ...

    def check(self, job: Path, store: FeatureStore) -> None:
        """Raise :class:`FactsError` naming every slide whose features cannot be paired with facts."""
        ...

    def slide(self, slide_id: str, features: SlideFeatures) -> SlideFacts: ...

    def region(self, slide_id: str, roi: ROI) -> RegionFacts: ...

    def window(self, slide_id: str, window: Window) -> WindowFacts: ...


def find_cohort(job: Path) -> Path | None:
    """The synthetic cohort a job's slides came from (``<cohort>/slides/*`` beside ``truth.json``), or None."""
    for status in read_statuses(job)[:1]:
        cohort = Path(status.slide_path).parent.parent
        if (cohort / TRUTH_FILE).is_file():
            return cohort
    return None


class TruthFacts:
    """Exact facts from a synthetic cohort's ``truth.json`` and label maps."""

    def __init__(self, cohort: str | Path) -> None:
        from slidevl.synth.truth import load_truth

        self.cohort = Path(cohort)
        try:
            self.truth = load_truth(self.cohort)
        except InputError as exc:  # no truth.json there, or one of another version
            raise FactsError(str(exc)) from exc

    def describe(self) -> dict[str, Any]:
        return {"source": "truth", "cohort": str(self.cohort)}

    def slide_ids(self) -> list[str]:
        return sorted(self.truth.slides)

    def patient_of(self, slide_id: str) -> str:
        return self.truth.slides[slide_id].patient_id

    def patient_strata(self) -> dict[str, int]:
        return {p: t.grade for p, t in self.truth.patients.items()}

    def check(self, job: Path, store: FeatureStore) -> None:
        slide_ids = self.slide_ids()
        slides = self.cohort / "slides"
        missing = [s for s in slide_ids if s not in store]
        if missing:
            raise FactsError(
                f"{store.root}: no features for {len(missing)} of {len(slide_ids)} cohort slide(s) "
                f"({_some(missing)}); run `slidevl preprocess {slides} --out {job}` first"
            )
        # The truth describes the cohort's slide files: features of any other file would be
        # paired with answers about a different image.
        unpaired = [f"{sid} ({diff})" for sid in slide_ids if (diff := self._difference(job, sid))]
        if unpaired:
            raise FactsError(
                f"{job}: {len(unpaired)} slide(s) were preprocessed from other files than the cohort's "
                f"({_some(unpaired)}); re-run `slidevl preprocess {slides} --out {job} --overwrite`"
            )

    def _difference(self, job: Path, slide_id: str) -> str | None:
        """How the cohort's file differs from the one the features were computed from (None: same, or unknown)."""
        truth = self.truth.slides[slide_id]
        status = read_status(job, slide_id)
        if status is None or not truth.path.is_file():
            return None
        return status.slide.change(truth.path)

    def slide(self, slide_id: str, features: SlideFeatures) -> SlideFacts:
        truth = self.truth.slides[slide_id]
        mpp = slide_mpp(features)
        if abs(mpp - truth.mpp) > 1e-6 * truth.mpp:
            raise FactsError(
                f"features of {slide_id} were made at {mpp} µm/px but {self.cohort / TRUTH_FILE} says {truth.mpp}; "
                "re-run `slidevl preprocess` without an mpp override for this cohort"
            )
        return slide_facts(truth)

    def region(self, slide_id: str, roi: ROI) -> RegionFacts:
        return region_facts(self.truth.slides[slide_id], roi)

    def window(self, slide_id: str, window: Window) -> WindowFacts:
        return window_facts(self.truth.slides[slide_id], window)


def _some(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")
