"""Captions and class prompts for tiles of the synthetic world, written from its planted truth.

A caption says what a pathologist would see in the tile: the tissue, the tumour's grade
and nuclear pleomorphism, how dense the lymphocytes are, whether there is necrosis or
fat. Each fact has several phrasings and the sentence several frames, drawn at random
per caption, so an aligned model learns the facts rather than memorising strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TISSUES = ("tumour", "stroma", "lymphocytes", "necrosis", "fat")

_GRADE = {
    1: ("well differentiated", "low grade", "grade 1"),
    2: ("moderately differentiated", "intermediate grade", "grade 2"),
    3: ("poorly differentiated", "high grade", "grade 3"),
}
_PLEOMORPHISM = {
    1: ("mild nuclear pleomorphism", "small uniform nuclei", "bland round nuclei"),
    2: ("moderate nuclear pleomorphism", "enlarged nuclei of varying size", "moderately atypical nuclei"),
    3: ("marked nuclear pleomorphism", "large irregular hyperchromatic nuclei", "severe nuclear atypia"),
}
PHRASES = {
    "tumour": ("tumour", "carcinoma", "malignant epithelium", "tumor cells"),
    "stroma": ("fibrous stroma", "collagenous stroma", "connective tissue", "desmoplastic stroma"),
    "lymphocytes": ("a dense lymphocytic infiltrate", "sheets of lymphocytes", "lymphoid cells", "immune cells"),
    "necrosis": ("necrosis", "necrotic debris", "coagulative necrosis", "dead tissue"),
    "fat": ("adipose tissue", "fat cells", "adipocytes", "fatty tissue"),
}
_FRAMES = (
    "an H&E image of {}.",
    "a histology patch showing {}.",
    "{}, H&E stain.",
    "microscopy of {} at 20x.",
    "this tissue shows {}.",
    "a pathology tile with {}.",
)
_LYMPH_DENSITY = ((0.4, ("dense lymphocytes", "a heavy immune infiltrate")), (0.15, ("scattered lymphocytes", "some immune cells")))


@dataclass(frozen=True)
class TileFacts:
    """What the planted truth says about one tile: class fractions and the tumour's grade."""

    fractions: dict[str, float]
    grade: int

    @property
    def tissue(self) -> str:
        """The dominant tissue class (background excluded)."""
        return max(TISSUES, key=lambda name: self.fractions.get(name, 0.0))

    @property
    def purity(self) -> float:
        """Fraction of the tile taken by its dominant class."""
        return float(self.fractions.get(self.tissue, 0.0))


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def describe_tissue(tissue: str, grade: int, rng: np.random.Generator) -> str:
    """One phrase for a tissue; tumour phrases carry grade and pleomorphism."""
    phrase = _pick(PHRASES[tissue], rng)
    if tissue != "tumour":
        return phrase
    grade_words, nuclei = _pick(_GRADE[grade], rng), _pick(_PLEOMORPHISM[grade], rng)
    return f"{grade_words} {phrase} with {nuclei}" if rng.random() < 0.5 else f"{phrase}, {grade_words}, {nuclei}"


def caption(facts: TileFacts, rng: np.random.Generator) -> str:
    """A varied caption for a tile: its main tissue, then the other tissue present."""
    parts = [describe_tissue(facts.tissue, facts.grade, rng)]
    lymph = facts.fractions.get("lymphocytes", 0.0)
    if facts.tissue != "lymphocytes":
        for floor, words in _LYMPH_DENSITY:
            if lymph >= floor:
                parts.append(_pick(words, rng))
                break
    for other in ("tumour", "necrosis", "fat", "stroma"):
        if other != facts.tissue and facts.fractions.get(other, 0.0) >= 0.2:
            parts.append(_pick(PHRASES[other], rng))
    text = parts[0] if len(parts) == 1 else f"{parts[0]} and " + " and ".join(parts[1:])
    return _pick(_FRAMES, rng).format(text)


def class_prompts(tissue: str) -> list[str]:
    """Every frame x phrase for a tissue: the zero-shot prompt ensemble of that class."""
    return [frame.format(phrase) for frame in _FRAMES for phrase in PHRASES[tissue]]
