"""The VQA record: one question about one slide, and its JSONL file format.

A record file is JSONL, one object per line::

    {"id": "s1-q3", "slide": "TCGA-XX-0001", "bbox": [0, 0, 4096, 4096],
     "level": "ROI", "category": "morphology", "format": "multi",
     "question": "Which features are present?",
     "options": ["Steatosis", "Ballooning", "Fibrosis"], "answer": "A,C"}

Contract (see DESIGN.md, "VQA records"):

- ``level`` is one of ``WSI``, ``ROI``, ``patch``; ``format`` one of ``single``,
  ``multi``, ``open``, ``caption`` (captions are ordinary records).
- ``bbox`` is optional, level-0 integer pixels ``[x0, y0, x1, y1]``.
- Choice formats store ``options`` as plain option texts. Their letters are their
  positions (A is the first); prompts render them as ``"A. text"``.
- For choice formats ``answer`` is the correct letters, comma separated (``"B"``,
  ``"A,C"``); ``single`` has exactly one, ``multi`` at least two. It is stored in
  canonical form (sorted, upper case, no spaces).
- For ``open``/``caption`` ``answer`` is the reference text and ``options`` is empty.
- ``meta`` is an optional free-form object for provenance (generator, seed, ROI id).
  Any other key is rejected, so a misspelt field never passes silently.

Reading reports every problem as ``file:line: field 'x': what is wrong``.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from slidevl.atomic import atomic_path
from slidevl.errors import InputError

LEVELS: tuple[str, ...] = ("WSI", "ROI", "patch")
FORMATS: tuple[str, ...] = ("single", "multi", "open", "caption")
CHOICE_FORMATS: tuple[str, ...] = ("single", "multi")
TEXT_FORMATS: tuple[str, ...] = ("open", "caption")
OPTION_LETTERS: str = string.ascii_uppercase
MAX_OPTIONS: int = len(OPTION_LETTERS)

_REQUIRED = ("id", "slide", "level", "category", "format", "question", "answer")
_OPTIONAL = ("bbox", "options", "meta")
_FIELDS = _REQUIRED + _OPTIONAL
# How many problems one read reports before it stops listing them.
_MAX_REPORTED_ERRORS = 20
# "A. text", "(B) text", "c) text": an option that already carries its letter.
_LETTERED_OPTION = re.compile(r"^\s*\(?([A-Za-z])[.)]\s+\S")


class VQARecordError(InputError):
    """A VQA record (or a file of them) breaks the contract.

    ``field`` names the offending field when there is a single one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def option_letter(index: int) -> str:
    """Letter of the option at 0-based ``index`` (0 -> ``"A"``)."""
    if not 0 <= index < MAX_OPTIONS:
        raise ValueError(f"option index {index} is outside 0..{MAX_OPTIONS - 1}")
    return OPTION_LETTERS[index]


def render_options(options: Iterable[str]) -> list[str]:
    """Render plain option texts the way prompts show them: ``["A. text", ...]``."""
    return [f"{option_letter(i)}. {text}" for i, text in enumerate(options)]


def parse_answer_letters(answer: str, n_options: int) -> frozenset[str]:
    """Parse a stored choice answer such as ``"B"`` or ``"A, C"`` into letters.

    This is the strict parser for gold data; free-text model answers go through
    :func:`slidevl.vqa.choices.parse_choice` instead.
    """
    parts = [p.strip() for p in answer.split(",")]
    if not parts or any(not p for p in parts):
        raise VQARecordError(
            f"choice answer {answer!r} must be comma-separated option letters such as 'B' or 'A,C'",
            field="answer",
        )
    letters: list[str] = []
    for part in parts:
        if len(part) != 1 or part.upper() not in OPTION_LETTERS:
            raise VQARecordError(
                f"choice answer {answer!r}: {part!r} is not an option letter (write letters such as 'B' or 'A,C')",
                field="answer",
            )
        letter = part.upper()
        if OPTION_LETTERS.index(letter) >= n_options:
            raise VQARecordError(
                f"choice answer {answer!r}: letter {letter} is outside the {n_options} options "
                f"(valid: {OPTION_LETTERS[0]}-{OPTION_LETTERS[n_options - 1]})",
                field="answer",
            )
        if letter in letters:
            raise VQARecordError(f"choice answer {answer!r} repeats letter {letter}", field="answer")
        letters.append(letter)
    return frozenset(letters)


@dataclass(frozen=True)
class VQARecord:
    """One question (or caption) about a slide, validated on construction."""

    id: str
    slide: str
    level: str
    category: str
    format: str
    question: str
    answer: str
    options: tuple[str, ...] = ()
    bbox: tuple[int, int, int, int] | None = None
    # Provenance only: excluded from equality and hashing (a dict is not hashable).
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("id", "slide", "category", "question"):
            _require_text(name, getattr(self, name))
        if self.level not in LEVELS:
            raise VQARecordError(f"level {self.level!r} is not one of {', '.join(LEVELS)}", field="level")
        if self.format not in FORMATS:
            raise VQARecordError(f"format {self.format!r} is not one of {', '.join(FORMATS)}", field="format")
        # Accept lists (from JSON or callers) but store tuples so records stay immutable.
        object.__setattr__(self, "options", _check_options(self.options, self.format))
        object.__setattr__(self, "bbox", _check_bbox(self.bbox))
        if not isinstance(self.meta, Mapping):
            raise VQARecordError(f"meta must be a JSON object, got {type(self.meta).__name__}", field="meta")
        object.__setattr__(self, "meta", dict(self.meta))
        if not isinstance(self.answer, str):
            raise VQARecordError(f"answer must be a string, got {type(self.answer).__name__}", field="answer")
        if self.format in CHOICE_FORMATS:
            letters = parse_answer_letters(self.answer, len(self.options))
            if self.format == "single" and len(letters) != 1:
                raise VQARecordError(
                    f"format 'single' needs exactly one correct letter, answer {self.answer!r} has {len(letters)}",
                    field="answer",
                )
            if self.format == "multi" and len(letters) < 2:
                raise VQARecordError(
                    f"format 'multi' needs at least two correct letters, answer {self.answer!r} has "
                    f"{len(letters)} (use format 'single' for one)",
                    field="answer",
                )
            object.__setattr__(self, "answer", ",".join(sorted(letters)))
        else:
            _require_text("answer", self.answer)

    @property
    def is_choice(self) -> bool:
        """True for ``single`` and ``multi`` records."""
        return self.format in CHOICE_FORMATS

    @property
    def answer_letters(self) -> frozenset[str]:
        """The correct letters of a choice record."""
        if not self.is_choice:
            raise ValueError(f"record {self.id!r} has format {self.format!r}, which has no answer letters")
        return frozenset(self.answer.split(","))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this record (``bbox``/``meta`` only when set)."""
        out: dict[str, Any] = {
            "id": self.id,
            "slide": self.slide,
            "level": self.level,
            "category": self.category,
            "format": self.format,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
        }
        if self.bbox is not None:
            out["bbox"] = list(self.bbox)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "VQARecord":
        """Build a record from a parsed JSON object, rejecting unknown or missing fields."""
        if not isinstance(obj, Mapping):
            raise VQARecordError(f"a record must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(_FIELDS))
        if unknown:
            raise VQARecordError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_FIELDS)} "
                "(put provenance under 'meta')",
                field=unknown[0],
            )
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise VQARecordError(f"missing required field(s) {', '.join(map(repr, missing))}", field=missing[0])
        options = obj.get("options")
        return cls(
            id=obj["id"],
            slide=obj["slide"],
            level=obj["level"],
            category=obj["category"],
            format=obj["format"],
            question=obj["question"],
            answer=obj["answer"],
            options=() if options is None else options,
            bbox=obj.get("bbox"),
            meta=obj.get("meta") or {},
        )


def _require_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise VQARecordError(f"{name} must be a string, got {type(value).__name__}", field=name)
    if not value.strip():
        raise VQARecordError(f"{name} is empty", field=name)


def _check_options(options: Any, fmt: str) -> tuple[str, ...]:
    if isinstance(options, str) or not isinstance(options, (list, tuple)):
        raise VQARecordError(f"options must be a list of strings, got {type(options).__name__}", field="options")
    opts = tuple(options)
    if fmt not in CHOICE_FORMATS:
        if opts:
            raise VQARecordError(f"format {fmt!r} takes no options, got {len(opts)}", field="options")
        return opts
    if len(opts) < 2:
        raise VQARecordError(f"format {fmt!r} needs at least 2 options, got {len(opts)}", field="options")
    if len(opts) > MAX_OPTIONS:
        raise VQARecordError(f"at most {MAX_OPTIONS} options (A-Z), got {len(opts)}", field="options")
    seen: dict[str, int] = {}
    for i, text in enumerate(opts):
        if not isinstance(text, str) or not text.strip():
            raise VQARecordError(f"option {i} must be a non-empty string, got {text!r}", field="options")
        key = " ".join(text.split()).casefold()
        if key in seen:
            # Duplicate texts would make answer-text -> letter mapping ambiguous.
            raise VQARecordError(
                f"options {option_letter(seen[key])} and {option_letter(i)} have the same text {text!r}",
                field="options",
            )
        seen[key] = i
    lettered = [_LETTERED_OPTION.match(t) for t in opts]
    if all(m is not None and m.group(1).upper() == option_letter(i) for i, m in enumerate(lettered)):
        raise VQARecordError(
            f"options look already lettered ({opts[0]!r}, ...); store plain option texts, "
            "letters are their positions",
            field="options",
        )
    return opts


def _check_bbox(bbox: Any) -> tuple[int, int, int, int] | None:
    if bbox is None:
        return None
    if isinstance(bbox, str) or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise VQARecordError(f"bbox must be [x0, y0, x1, y1] (level-0 pixels), got {bbox!r}", field="bbox")
    # bool is an int subclass, and floats would hide sub-pixel coordinates: both rejected.
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in bbox):
        raise VQARecordError(f"bbox must hold integer level-0 pixels, got {bbox!r}", field="bbox")
    x0, y0, x1, y1 = bbox
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise VQARecordError(f"bbox {list(bbox)} needs 0 <= x0 < x1 and 0 <= y0 < y1", field="bbox")
    return (x0, y0, x1, y1)


def read_records(path: str | os.PathLike[str]) -> list[VQARecord]:
    """Read and validate a VQA JSONL file; blank lines are skipped.

    Raises :class:`VQARecordError` listing every bad line (up to 20) as
    ``file:line: message``, including duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise VQARecordError(f"{path}: VQA record file not found")
    records: list[VQARecord] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            try:
                record = VQARecord.from_dict(obj)
            except VQARecordError as exc:
                rid = obj.get("id") if isinstance(obj, dict) else None
                where = f" (id {rid!r})" if isinstance(rid, str) else ""
                prefix = f"field {exc.field!r}: " if exc.field else ""
                errors.append(f"{path}:{lineno}{where}: {prefix}{exc}")
                continue
            if record.id in first_line:
                first = first_line[record.id]
                errors.append(f"{path}:{lineno}: field 'id': duplicate id {record.id!r} (first seen on line {first})")
                continue
            first_line[record.id] = lineno
            records.append(record)
    if errors:
        raise VQARecordError(_summarise_errors(errors, path))
    if not records:
        raise VQARecordError(f"{path}: no VQA records found (the file is empty)")
    return records


def write_records(path: str | os.PathLike[str], records: Iterable[VQARecord]) -> Path:
    """Write records as JSONL atomically; duplicate ids are refused before writing."""
    records = list(records)
    seen: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, VQARecord):
            raise TypeError(f"records[{i}] is a {type(record).__name__}, expected VQARecord")
        if record.id in seen:
            raise VQARecordError(f"{path}: cannot write duplicate id {record.id!r} (records[{i}])", field="id")
        seen.add(record.id)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    return path


def _summarise_errors(errors: list[str], path: Path) -> str:
    shown = errors[:_MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    head = f"{path}: {len(errors)} invalid VQA record line(s)"
    tail = [f"... and {more} more"] if more else []
    return "\n".join([head, *shown, *tail])
