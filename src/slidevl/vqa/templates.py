"""Template questions and captions from ground-truth facts, WSI -> ROI -> patch.

Every question is written from :mod:`slidevl.vqa.templates_facts`, so its answer is a
function of what is in the image (the label map and the planted grade):

========  ===========================================================================
level     questions (``meta.template``)
========  ===========================================================================
WSI       diagnosis (open), morphology (open), grade (single), tumour burden, necrosis
          extent, lymphocytic infiltration, dominant tissue (single), tissue types
          present (multi), caption; spatial (single): nodule count, fragment count,
          tumour at the tissue edge, necrosis inside or next to tumour, part of the
          largest nodule, its size class
ROI       dominant tissue (single), tissue types present (multi), tumour / necrosis /
          fat extent (single), description (open), caption; spatial (single): nodule
          count, tumour at the tissue edge, necrosis inside or next to tumour, part of
          the largest tumour focus
patch     dominant tissue (single), tissue types present (multi), nuclear grade at
          high power (single: grade 1-3 or no tumour), description (open), caption
========  ===========================================================================

Choice questions:

* ``single`` has 4 options and one answer. Distractors are other tissue classes, other
  grades, or the other bins of a graded scale. The correct option's position is
  drawn from a shuffled deck of A-D per slide, so every letter is right equally often
  and the position cannot be learnt; the distractors are shuffled around it.
* ``multi`` lists all five tissue classes in a shuffled order; it is asked only when at
  least two are present (otherwise it would be a single choice).
* Spatial questions (category ``spatial``) come from the measured layout
  (:mod:`slidevl.synth.spatial`); each has several wordings and a closed set of short
  option texts, so a free-text answer that restates one ("two", "yes", "upper left")
  is read as that option. Yes/no questions (tumour at the edge, necrosis inside or
  next to tumour) have two options, balanced on their own deck. A question whose
  answer the layout leaves ambiguous is not asked. "Part" is a cell of a 3 x 3 grid
  on the bounding box of the tissue in view (:data:`slidevl.synth.spatial.PART_NAMES`);
  nodule size classes are :data:`NODULE_SIZE` (mm²).

Captions chain: the ROI caption compares the region with the slide (the WSI facts it
is given), the patch caption places the field within its region. The LLM mode of
:mod:`slidevl.vqa.chain` replaces caption and open texts, never the choice answers.

Randomness (phrasing, distractors, order) comes from a generator seeded by the build
seed and the record id, so a record does not change when other slides are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from slidevl.qa.records import OPTION_LETTERS, VQARecord
from slidevl.synth.spatial import PART_NAMES, Spatial
from slidevl.vqa.templates_facts import (
    GRADE_MORPHOLOGY,
    GRADE_NAMES,
    PRESENT_FRACTION,
    TISSUE_NAMES,
    Composition,
    RegionFacts,
    SlideFacts,
    WindowFacts,
)

N_SINGLE_OPTIONS = 4
NO_TUMOUR_OPTION = "no tumour in this field"
NO_TUMOUR_SLIDE = "no tumour present"

# Graded scales: (upper bound of the bin as a fraction of the tissue, option text).
TUMOUR_BURDEN = ((0.20, "less than 20%"), (0.35, "20-35%"), (0.50, "35-50%"), (np.inf, "more than 50%"))
NECROSIS_EXTENT = ((0.01, "none"), (0.05, "focal (1-5%)"), (0.15, "moderate (5-15%)"), (np.inf, "extensive (15% or more)"))
LYMPHOCYTE_EXTENT = ((0.05, "sparse (under 5%)"), (0.10, "mild (5-10%)"), (0.15, "moderate (10-15%)"), (np.inf, "marked (15% or more)"))
REGION_EXTENT = ((0.01, "absent"), (0.10, "under 10%"), (0.40, "10-40%"), (np.inf, "over 40%"))
NODULE_COUNTS = ("one", "two", "three", "four or more")
# Area of the largest nodule, mm². Set on the default cohort (4096 px slides at
# 0.5 µm/px, about 2 x 2 mm) so that each class holds a fair share of slides.
NODULE_SIZE = ((0.3, "under 0.3 mm²"), (0.4, "0.3-0.4 mm²"), (0.55, "0.4-0.55 mm²"), (np.inf, "0.55 mm² or more"))
YES_NO = ("yes", "no")
NECROSIS_RELATIONS = {"inside": "inside the tumour", "next to": "next to the tumour"}


def scale_bin(value: float, scale: Sequence[tuple[float, str]]) -> str:
    """The option text of the bin of a graded ``scale`` holding ``value``."""
    for upper, text in scale:
        if value < upper:
            return text
    return scale[-1][1]


def nodule_option(n: int) -> str:
    """Option text for a count of nodules or fragments (at least one)."""
    if n < 1:
        raise ValueError("a count question is only asked where there is at least one")
    return NODULE_COUNTS[min(n, len(NODULE_COUNTS)) - 1]


def stable_int(*parts: object) -> int:
    """A 64-bit integer from the text of ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """The generator of one record: depends on the build seed and the record id only."""
    return np.random.default_rng([seed, stable_int(record_id)])


class LetterDeck:
    """Positions of the correct option, drawn from shuffled decks of all positions."""

    def __init__(self, seed: int, key: str, n_options: int = N_SINGLE_OPTIONS) -> None:
        self._rng = np.random.default_rng([seed, stable_int("letters", key)])
        self._n = n_options
        self._deck: list[int] = []

    def draw(self) -> int:
        if not self._deck:
            self._deck = self._rng.permutation(self._n).tolist()
        return self._deck.pop()


@dataclass
class Unit:
    """One thing questions are asked about: a slide, an ROI or a window."""

    level: str  # WSI / ROI / patch
    key: str  # id prefix of its records, e.g. "SYN-0001-01-R2-20x"
    slide: str
    patient: str
    bbox: tuple[int, int, int, int] | None
    facts: SlideFacts | RegionFacts | WindowFacts
    parent: str | None = None  # key of the unit one level up
    records: list[VQARecord] = field(default_factory=list)

    @property
    def caption(self) -> VQARecord:
        """This unit's caption record."""
        for record in self.records:
            if record.format == "caption":
                return record
        raise KeyError(f"unit {self.key} has no caption")


class Writer:
    """Builds the records of one slide's units with shared letter balancing.

    Each number of options has its own deck, so two-option questions are balanced
    between A and B without unbalancing the four-option ones.
    """

    def __init__(self, seed: int, slide: str) -> None:
        self.seed = seed
        self.slide = slide
        self.decks: dict[int, LetterDeck] = {}

    def deck(self, n_options: int) -> LetterDeck:
        """The slide's deck of correct positions for questions with ``n_options`` options."""
        if n_options not in self.decks:
            self.decks[n_options] = LetterDeck(self.seed, f"{self.slide}/{n_options}", n_options)
        return self.decks[n_options]

    def _meta(self, unit: Unit, template: str, truth: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {"template": template, "unit": unit.key, "patient": unit.patient, "generator": "template"}
        if isinstance(unit.facts, RegionFacts):
            meta["roi"] = unit.facts.roi_id
        if isinstance(unit.facts, WindowFacts):
            meta.update(roi=unit.facts.roi_id, window=unit.facts.window_id, magnification=unit.facts.magnification)
        if truth is not None:
            meta["truth"] = truth
        return meta

    def _record(self, unit: Unit, template: str, category: str, fmt: str, question: str, answer: str,
                truth: Any, options: Sequence[str] = ()) -> VQARecord:
        return VQARecord(
            id=f"{unit.key}-{template}",
            slide=unit.slide,
            level=unit.level,
            category=category,
            format=fmt,
            question=question,
            answer=answer,
            options=tuple(options),
            bbox=unit.bbox,
            meta=self._meta(unit, template, truth),
        )

    def phrase(self, unit: Unit, template: str, variants: Sequence[str]) -> str:
        """One of ``variants``, chosen by the record's own generator."""
        return variants[int(record_rng(self.seed, f"{unit.key}-{template}-q").integers(len(variants)))]

    def single(self, unit: Unit, template: str, category: str, question: str, correct: str,
               distractors: Sequence[str], truth: Any, n_options: int = N_SINGLE_OPTIONS) -> VQARecord:
        """An ``n_options`` single-choice record with the correct option at a balanced position."""
        pool = [d for d in dict.fromkeys(distractors) if d != correct]
        if len(pool) < n_options - 1:
            raise ValueError(f"{unit.key}-{template}: {len(pool)} distractors, need {n_options - 1}")
        rng = record_rng(self.seed, f"{unit.key}-{template}")
        picked = [pool[i] for i in rng.permutation(len(pool))[: n_options - 1]]
        position = self.deck(n_options).draw()
        options = picked[:position] + [correct] + picked[position:]
        return self._record(unit, template, category, "single", question, OPTION_LETTERS[position], truth, options)

    def multi(self, unit: Unit, template: str, category: str, question: str, correct: Sequence[str],
              options: Sequence[str], truth: Any) -> VQARecord:
        """A multi-choice record over ``options`` in a shuffled order."""
        rng = record_rng(self.seed, f"{unit.key}-{template}")
        shuffled = [options[i] for i in rng.permutation(len(options))]
        letters = ",".join(OPTION_LETTERS[i] for i, text in enumerate(shuffled) if text in set(correct))
        return self._record(unit, template, category, "multi", question, letters, truth, shuffled)

    def text(self, unit: Unit, template: str, category: str, fmt: str, question: str, answer: str,
             truth: Any = None) -> VQARecord:
        """An open or caption record."""
        return self._record(unit, template, category, fmt, question, answer, truth)


# -- sentences ---------------------------------------------------------------------------

def pct(value: float) -> str:
    """A fraction as a whole percentage; small but non-zero amounts say "<1%"."""
    if 0 < value < 0.005:
        return "<1%"
    return f"{round(100 * value)}%"


def _join(parts: Sequence[str], word: str = "and") -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" {word} " + parts[-1]


def composition_sentence(c: Composition) -> str:
    """"mainly tumour (62%), with fibrous stroma (30%) and necrosis (8%)" and the like."""
    ranked = sorted(c.tissue.items(), key=lambda kv: -kv[1])
    major = [(n, v) for n, v in ranked if v >= PRESENT_FRACTION]
    minor = [n for n, v in ranked if 0.005 <= v < PRESENT_FRACTION]
    (head, share), rest = major[0], major[1:]
    if share >= 0.995:
        text = f"entirely {TISSUE_NAMES[head]}"
    elif share >= 0.5:
        text = f"mainly {TISSUE_NAMES[head]} ({pct(share)})"
        if rest:
            text += ", with " + _join([f"{TISSUE_NAMES[n]} ({pct(v)})" for n, v in rest])
    else:
        text = "a mixture of " + _join([f"{TISSUE_NAMES[n]} ({pct(v)})" for n, v in major])
    if minor:
        text += "; traces of " + _join([TISSUE_NAMES[n] for n in minor])
    return text


def _compare(part: float, whole: float) -> str:
    if part > whole + 0.10:
        return "more tumour than"
    if part < whole - 0.10:
        return "less tumour than"
    return "about as much tumour as"


def _absent_note(c: Composition, names: Sequence[str]) -> str:
    absent = [TISSUE_NAMES[n] for n in names if c.tissue[n] < 0.005]
    return f" No {_join(absent, 'or')} is seen." if absent else ""


def _short(text: str) -> str:
    # "focal (1-5%)" -> "focal": the bin's word, for sentences that give the number.
    return text.split(" (")[0]


def _nodules(n: int) -> str:
    return "a single tumour nodule" if n == 1 else f"{n} tumour nodules"


def diagnosis_sentence(f: SlideFacts) -> str:
    """The diagnosis in one sentence."""
    if not f.has_tumour:
        return "No tumour is seen on this slide."
    return (
        f"A carcinoma, {GRADE_NAMES[f.grade]}, forming {_nodules(f.n_nodules)} and occupying about "
        f"{pct(f.composition.tissue['tumour'])} of the tissue."
    )


def wsi_caption(f: SlideFacts) -> str:
    c = f.composition
    necrosis = _short(scale_bin(c.tissue["necrosis"], NECROSIS_EXTENT))
    lymph = _short(scale_bin(c.tissue["lymphocytes"], LYMPHOCYTE_EXTENT))
    return (
        f"Low-power view of {f.tissue_area_mm2:.1f} mm² of tissue. {diagnosis_sentence(f)} "
        f"The tissue is {composition_sentence(c)}. Necrosis is {necrosis} ({pct(c.tissue['necrosis'])}) and "
        f"lymphocytic infiltration is {lymph} ({pct(c.tissue['lymphocytes'])})."
    )


def roi_caption(r: RegionFacts, s: SlideFacts) -> str:
    c = r.composition
    tumour, whole = c.tissue["tumour"], s.composition.tissue["tumour"]
    return (
        f"Region {r.roi_id} ({r.area_mm2:.2f} mm² of tissue) is {composition_sentence(c)}. "
        f"It holds {_compare(tumour, whole)} the slide as a whole ({pct(tumour)} against {pct(whole)})."
        + _absent_note(c, ("tumour", "necrosis", "fat"))
    )


def patch_caption(w: WindowFacts, r: RegionFacts) -> str:
    c = w.composition
    region_main = TISSUE_NAMES[r.composition.dominant]
    if c.dominant == r.composition.dominant:
        relation = f"This matches region {r.roi_id}, where {region_main} also predominates."
    else:
        relation = f"By contrast, {region_main} predominates in region {r.roi_id} as a whole."
    text = f"A {w.magnification} field ({w.size_um:.0f} µm wide) that is {composition_sentence(c)}. {relation}"
    if w.shows_grade:
        text += f" Tumour cells show {GRADE_MORPHOLOGY[w.grade]}, consistent with {GRADE_NAMES[w.grade]}."
    elif w.tumour_free:
        text += " No tumour cells are present."
    return text


# -- questions per level -----------------------------------------------------------------

_TISSUE_OPTIONS = list(TISSUE_NAMES.values())


def _dominant(wr: Writer, unit: Unit, c: Composition, where: str) -> VQARecord:
    correct = TISSUE_NAMES[c.dominant]
    question = wr.phrase(unit, "dominant", [
        f"Which tissue type makes up most of the tissue in {where}?",
        f"What is the predominant tissue component in {where}?",
    ])
    return wr.single(unit, "dominant", "composition", question, correct, _TISSUE_OPTIONS,
                     {"dominant": c.dominant, "fractions": _rounded(c)})


def _present(wr: Writer, unit: Unit, c: Composition, where: str) -> VQARecord | None:
    present = c.present()
    if len(present) < 2:
        return None
    question = wr.phrase(unit, "present", [
        f"Which tissue types are present in {where} (each at least {pct(PRESENT_FRACTION)} of the tissue)? "
        "Select all that apply.",
        f"Select every tissue component that makes up at least {pct(PRESENT_FRACTION)} of the tissue in {where}.",
    ])
    return wr.multi(unit, "present", "composition", question, [TISSUE_NAMES[n] for n in present], _TISSUE_OPTIONS,
                    {"present": present, "fractions": _rounded(c)})


def _scale_question(wr: Writer, unit: Unit, template: str, category: str, question: str, value: float,
                    scale: Sequence[tuple[float, str]]) -> VQARecord:
    correct = scale_bin(value, scale)
    return wr.single(unit, template, category, question, correct, [t for _, t in scale], {"fraction": round(value, 4)})


# The slide's binned share questions: template, category, tissue, bins, question ({on}: where).
SLIDE_SCALE_QUESTIONS: tuple[tuple[str, str, str, tuple[tuple[float, str], ...], str], ...] = (
    ("tumour_burden", "composition", "tumour", TUMOUR_BURDEN,
     "Approximately what fraction of the tissue {on} is tumour?"),
    ("necrosis", "morphology", "necrosis", NECROSIS_EXTENT,
     "How extensive is tumour necrosis {on} (as a share of the tissue)?"),
    ("lymphocytes", "morphology", "lymphocytes", LYMPHOCYTE_EXTENT,
     "How marked is the lymphocytic infiltration {on} (as a share of the tissue)?"),
)


def slide_scale_records(wr: Writer, unit: Unit, on: str) -> list[VQARecord]:
    """The slide's binned tumour, necrosis and lymphocyte share questions about ``unit``.

    ``on`` places them ("on this slide"); asked of a training region ("in this region"),
    they teach the slide's bins from many boxes instead of one answer per slide.
    """
    c = unit.facts.composition
    return [_scale_question(wr, unit, template, category, question.format(on=on), c.tissue[tissue], bins)
            for template, category, tissue, bins, question in SLIDE_SCALE_QUESTIONS]


# -- spatial questions -------------------------------------------------------------------

# Wordings per spatial template; {where} is "this slide" or "this region".
SPATIAL_WORDINGS: dict[str, tuple[str, ...]] = {
    "nodules": (
        "How many separate tumour nodules are visible in {where}?",
        "Count the distinct tumour nodules in {where}.",
        "Into how many separate foci is the tumour in {where} divided?",
        "How many discrete tumour nodules does {where} contain?",
    ),
    "fragments": (
        "How many separate pieces of tissue are on {where}?",
        "Into how many fragments is the tissue section on {where} divided?",
        "Count the separate tissue fragments on {where}.",
    ),
    "tumour_edge": (
        "Does the tumour reach the edge of the tissue in {where}?",
        "Does tumour touch the border between tissue and glass in {where}?",
        "Is the tumour in {where} in contact with the edge of the tissue section?",
    ),
    "necrosis_relation": (
        "Does the necrosis in {where} lie inside the tumour or next to it?",
        "Where is the necrosis in {where} relative to the tumour?",
        "Is the necrosis in {where} surrounded by tumour, or does it lie at the tumour's margin, next to it?",
    ),
    "tumour_part": (
        "In which part of the tissue in {where} does the largest tumour focus lie?",
        "Where in {where} is the largest tumour nodule (upper, middle or lower; left, centre or right of the tissue)?",
        "Which part of the tissue in {where}, divided into a 3 x 3 grid, holds the largest tumour focus?",
    ),
    "nodule_size": (
        "How large is the largest tumour nodule on {where}?",
        "What is the area of the largest tumour nodule on {where}?",
        "Which size class fits the biggest tumour nodule on {where}?",
    ),
}
# A largest-nodule area this close (relative) to a size-class bound is not asked about.
SIZE_MARGIN = 0.05


def _spatial(wr: Writer, unit: Unit, template: str, where: str, correct: str, options: Sequence[str],
             truth: Any) -> VQARecord:
    question = wr.phrase(unit, template, [w.format(where=where) for w in SPATIAL_WORDINGS[template]])
    n_options = min(N_SINGLE_OPTIONS, len(options))
    return wr.single(unit, template, "spatial", question, correct, options, truth, n_options)


def spatial_answer(sp: Spatial, template: str) -> str | None:
    """The option text that answers spatial ``template`` for the layout ``sp``; None where it is unclear.

    The slide-level nodule count and nodule-size questions add conditions of their own
    (see :func:`spatial_records`); this is the answer a reader of the layout gives.
    """
    if template in ("nodules", "fragments"):
        n = sp.n_nodules if template == "nodules" else sp.n_fragments
        return nodule_option(n) if n else None
    if template == "tumour_edge":
        return None if sp.tumour_at_edge is None else YES_NO[0] if sp.tumour_at_edge else YES_NO[1]
    if template == "necrosis_relation":
        return None if sp.necrosis_relation is None else NECROSIS_RELATIONS[sp.necrosis_relation]
    if template == "tumour_part":
        return sp.largest_nodule_part
    if template == "nodule_size":
        return scale_bin(sp.nodules[0].area_mm2, NODULE_SIZE) if sp.nodules else None
    raise ValueError(f"{template!r} is not a spatial template ({', '.join(SPATIAL_WORDINGS)})")


def spatial_records(wr: Writer, unit: Unit, where: str) -> list[VQARecord]:
    """The spatial questions about a slide or an ROI whose answers its facts make clear.

    Without a measured layout (facts from an LLM) only the slide's nodule count is asked.
    """
    f = unit.facts
    assert isinstance(f, (SlideFacts, RegionFacts))
    sp = f.spatial
    out = []
    if isinstance(f, SlideFacts):
        slide, n, truth = True, f.countable_nodules, {"planted": f.planted_nodules}
    else:
        slide, n, truth = False, None if sp is None else sp.n_nodules, {}
    if n:
        out.append(_spatial(wr, unit, "nodules", where, nodule_option(n), NODULE_COUNTS, {"n_nodules": n, **truth}))
    if sp is None:
        return out
    if slide and sp.n_fragments:
        out.append(_spatial(wr, unit, "fragments", where, spatial_answer(sp, "fragments"), NODULE_COUNTS,
                            {"n_fragments": sp.n_fragments,
                             "fragment_areas_mm2": [round(p.area_mm2, 4) for p in sp.fragments]}))
    if sp.tumour_at_edge is not None:
        out.append(_spatial(wr, unit, "tumour_edge", where, spatial_answer(sp, "tumour_edge"), YES_NO,
                            {"tumour_at_edge": sp.tumour_at_edge,
                             "contact_um": round(sp.tumour_edge_contact_um, 1),
                             "gap_um": _round(sp.tumour_edge_gap_um, 1)}))
    if sp.necrosis_relation is not None:
        out.append(_spatial(wr, unit, "necrosis_relation", where, spatial_answer(sp, "necrosis_relation"),
                            list(NECROSIS_RELATIONS.values()),
                            {"relation": sp.necrosis_relation, "tumour_share_of_border": _round(sp.necrosis_tumour_share, 4),
                             "necrosis_mm2": round(sp.necrosis_mm2, 4)}))
    part = sp.largest_nodule_part
    if part is not None:
        out.append(_spatial(wr, unit, "tumour_part", where, part, PART_NAMES,
                            {"part": part, "centroid": [round(v) for v in sp.nodules[0].centroid],
                             "tissue_bbox": list(sp.tissue_bbox or ())}))
    size = sp.nodules[0].area_mm2 if sp.nodules else None
    if slide and size is not None and all(abs(size - b) > SIZE_MARGIN * b for b, _ in NODULE_SIZE[:-1]):
        out.append(_spatial(wr, unit, "nodule_size", where, spatial_answer(sp, "nodule_size"), [t for _, t in NODULE_SIZE],
                            {"area_mm2": round(size, 4)}))
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(c: Composition) -> dict[str, float]:
    return {n: round(v, 4) for n, v in c.tissue.items()}


def wsi_records(wr: Writer, unit: Unit) -> list[VQARecord]:
    """Questions and the caption about a whole slide."""
    f = unit.facts
    assert isinstance(f, SlideFacts)
    c = f.composition
    where = "this slide"
    necrosis = _short(scale_bin(c.tissue["necrosis"], NECROSIS_EXTENT))
    lymph = _short(scale_bin(c.tissue["lymphocytes"], LYMPHOCYTE_EXTENT))
    out = [
        wr.text(unit, "caption", "description", "caption",
                wr.phrase(unit, "caption", ["Describe this whole-slide image.", "Give a low-power description of this slide."]),
                wsi_caption(f)),
        wr.text(unit, "diagnosis", "diagnosis", "open",
                wr.phrase(unit, "diagnosis", ["What is the diagnosis for this slide?", "Is there tumour on this slide, and of what kind?"]),
                diagnosis_sentence(f),
                {"grade": f.grade, "n_nodules": f.n_nodules, "tumour_fraction": round(c.tissue["tumour"], 4)}),
        wr.text(unit, "morphology", "morphology", "open",
                wr.phrase(unit, "morphology", ["Describe the necrosis and inflammation in this slide.",
                                               "How much necrosis and lymphocytic infiltration does this slide show?"]),
                f"Necrosis is {necrosis} ({pct(c.tissue['necrosis'])} of the tissue) and lymphocytic infiltration is "
                f"{lymph} ({pct(c.tissue['lymphocytes'])}).",
                {"necrosis": round(c.tissue["necrosis"], 4), "lymphocytes": round(c.tissue["lymphocytes"], 4)}),
        wr.single(unit, "grade", "grade",
                  wr.phrase(unit, "grade", ["What is the histological grade of the tumour on this slide?",
                                            "How differentiated is the carcinoma on this slide?"]),
                  GRADE_NAMES[f.grade] if f.has_tumour else NO_TUMOUR_SLIDE,
                  [*GRADE_NAMES.values(), NO_TUMOUR_SLIDE], {"grade": f.grade if f.has_tumour else None}),
        *slide_scale_records(wr, unit, "on this slide"),
        _dominant(wr, unit, c, where),
        *spatial_records(wr, unit, where),
    ]
    present = _present(wr, unit, c, where)
    return out + ([present] if present else [])


def roi_records(wr: Writer, unit: Unit, slide: SlideFacts) -> list[VQARecord]:
    """Questions and the caption about one ROI (its bbox)."""
    f = unit.facts
    assert isinstance(f, RegionFacts)
    c = f.composition
    where = "this region"
    out = [
        wr.text(unit, "caption", "description", "caption",
                wr.phrase(unit, "caption", ["Describe this region.", "Give a description of the tissue in this region."]),
                roi_caption(f, slide)),
        wr.text(unit, "description", "morphology", "open",
                wr.phrase(unit, "description", ["What tissue does this region contain?",
                                                "Describe the tissue composition of this region."]),
                f"This region is {composition_sentence(c)}." + _absent_note(c, ("tumour", "necrosis", "fat")),
                {"fractions": _rounded(c)}),
        _dominant(wr, unit, c, where),
        _scale_question(wr, unit, "tumour_extent", "diagnosis",
                        "How much of the tissue in this region is tumour?", c.tissue["tumour"], REGION_EXTENT),
        _scale_question(wr, unit, "necrosis_extent", "morphology",
                        "How much of the tissue in this region is necrotic?", c.tissue["necrosis"], REGION_EXTENT),
        _scale_question(wr, unit, "fat_extent", "composition",
                        "How much of the tissue in this region is adipose tissue (fat)?", c.tissue["fat"], REGION_EXTENT),
        *spatial_records(wr, unit, where),
    ]
    present = _present(wr, unit, c, where)
    return out + ([present] if present else [])


def patch_records(wr: Writer, unit: Unit, region: RegionFacts) -> list[VQARecord]:
    """Questions and the caption about one field of view."""
    f = unit.facts
    assert isinstance(f, WindowFacts)
    c = f.composition
    where = f"this {f.magnification} field"
    description = f"This field is {composition_sentence(c)}."
    if f.shows_grade:
        description += f" The tumour cells have {GRADE_MORPHOLOGY[f.grade]}."
    out = [
        wr.text(unit, "caption", "description", "caption",
                wr.phrase(unit, "caption", ["Describe this field of view.", "What does this field of view show?"]),
                patch_caption(f, region)),
        wr.text(unit, "description", "morphology", "open",
                wr.phrase(unit, "description", [f"What tissue is seen in {where}?", f"Describe {where}."]),
                description, {"fractions": _rounded(c)}),
        _dominant(wr, unit, c, where),
    ]
    # Asked only at high power, and only when the field clearly holds tumour or clearly holds none.
    if f.high_power and (f.shows_grade or f.tumour_free):
        correct = GRADE_NAMES[f.grade] if f.shows_grade else NO_TUMOUR_OPTION
        out.append(wr.single(unit, "nuclear_grade", "grade",
                             f"Judging by the nuclei in {where}, what is the tumour grade?",
                             correct, [*GRADE_NAMES.values(), NO_TUMOUR_OPTION],
                             {"grade": f.grade if f.shows_grade else None,
                              "tumour_fraction": round(c.tissue["tumour"], 4)}))
    present = _present(wr, unit, c, where)
    return out + ([present] if present else [])
