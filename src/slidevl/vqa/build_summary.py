"""Counts and sanity baselines of a built QA set, for ``QA/summary.json``.

Besides counts per split, level, format and category, the summary measures how much a
model could score *without looking at the slide*, on the test split:

* ``chance``: the expected accuracy of a uniform guess (1/options for single choice,
  the chance of hitting the exact set for multi choice);
* ``majority_text``: answer every test question with the option text that was most
  often correct for the same question template (level + template) in train;
* ``majority_letter``: always answer the letter most often correct in train.

Answers that depend on the image keep these far below what a model that sees the
slide can reach; a template whose majority baseline is high is a weak question.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from slidevl.qa.records import VQARecord


def _template(record: VQARecord) -> str:
    return f"{record.level}/{record.meta.get('template', record.category)}"


def _answer_text(record: VQARecord) -> frozenset[str]:
    return frozenset(record.options[ord(letter) - ord("A")] for letter in record.answer_letters)


def counts(records: Sequence[VQARecord]) -> dict[str, Any]:
    """Counts of records per level, format, category, level/format and template."""
    return {
        "total": len(records),
        "level": dict(sorted(Counter(r.level for r in records).items())),
        "format": dict(sorted(Counter(r.format for r in records).items())),
        "category": dict(sorted(Counter(r.category for r in records).items())),
        "level_format": dict(sorted(Counter(f"{r.level}/{r.format}" for r in records).items())),
        "template": dict(sorted(Counter(_template(r) for r in records).items())),
    }


def letter_balance(records: Iterable[VQARecord]) -> dict[str, int]:
    """How often each letter is the answer of a single-choice record."""
    return dict(sorted(Counter(r.answer for r in records if r.format == "single").items()))


def _chance(record: VQARecord) -> float:
    n = len(record.options)
    if record.format == "single":
        return 1.0 / n
    # Multi choice: a uniform guess over every non-empty subset of the (at most 26) options.
    return 1.0 / (2**n - 1)


def blind_baselines(train: Sequence[VQARecord], test: Sequence[VQARecord]) -> dict[str, Any]:
    """Test accuracy of answer strategies that never look at the slide (see module doc)."""
    choice_train = [r for r in train if r.is_choice]
    choice_test = [r for r in test if r.is_choice]
    if not choice_test:
        return {"n_test_choice": 0}
    by_template: dict[str, Counter[frozenset[str]]] = {}
    for r in choice_train:
        by_template.setdefault(_template(r), Counter())[_answer_text(r)] += 1
    letters = Counter(r.answer for r in choice_train)
    top_letter = letters.most_common(1)[0][0] if letters else "A"
    majority_hits = 0
    letter_hits = 0
    per_template: dict[str, list[int]] = {}
    for r in choice_test:
        seen = by_template.get(_template(r))
        guess = seen.most_common(1)[0][0] if seen else frozenset()
        hit = int(guess == _answer_text(r))
        majority_hits += hit
        letter_hits += int(r.answer == top_letter)
        per_template.setdefault(_template(r), []).append(hit)
    n = len(choice_test)
    return {
        "n_test_choice": n,
        "chance": round(sum(_chance(r) for r in choice_test) / n, 4),
        "majority_text": round(majority_hits / n, 4),
        "majority_letter": round(letter_hits / n, 4),
        "majority_text_per_template": {k: round(sum(v) / len(v), 4) for k, v in sorted(per_template.items())},
    }


def split_summary(name: str, records: Sequence[VQARecord], patients: Sequence[str],
                  slides: Mapping[str, str]) -> dict[str, Any]:
    """One split's patients, slides and record counts."""
    mine = set(patients)
    return {
        "patients": sorted(mine),
        "n_patients": len(mine),
        "n_slides": sum(1 for p in slides.values() if p in mine),
        "counts": counts(records),
        "answer_letters": letter_balance(records),
    }

