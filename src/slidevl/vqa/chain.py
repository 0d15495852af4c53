"""LLM mode: chained captions and open answers, WSI -> ROI -> patch, through any OpenAI-compatible endpoint.

The template records of :mod:`slidevl.vqa.templates` stay the source of truth. For
every unit (slide, ROI, window) one request asks the model to rewrite the unit's
caption and open answers in fluent pathology language, given

* the caption of the unit one level up (``context``: the slide's caption for an ROI,
  the ROI's caption for a window), which is the model's own rewritten caption when
  that succeeded, so the chain stays consistent from macro to micro;
* the ground-truth facts of the unit (:mod:`slidevl.vqa.templates_facts`) and the
  template drafts, so the model only rephrases and expands and never decides a fact.

Levels run in order, each level's requests in parallel through :class:`LLMClient`
(temperature 0, concurrency limit, retries, disk cache). Choice records are never
sent: their answers come from the truth.

A reply is used only if it parses as JSON (:func:`slidevl.vqa.judge.parse_json_reply`)
with a non-empty ``caption`` and one non-empty answer per requested item id, and if it
names no tumour grade other than the true one. Otherwise the unit keeps its template
texts, its records say so in ``meta.llm_error``, and the failure is reported with the
reply; nothing is dropped silently. Endpoint errors (unreachable, HTTP errors after
retries) stop the build: they are not a property of one item.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from slidevl.errors import ServiceError
from slidevl.llmclient import LLMClient
from slidevl.qa.records import LEVELS, TEXT_FORMATS, VQARecord
from slidevl.vqa.judge import JudgeReplyError, parse_json_reply
from slidevl.vqa.templates import Unit
from slidevl.vqa.templates_facts import RegionFacts, SlideFacts, WindowFacts

SYSTEM = (
    "You are an experienced pathologist writing teaching material about histopathology images. "
    "Use only the facts you are given: rephrase and expand them in precise pathology language, "
    "never add findings, numbers or grades that the facts do not state. Reply with JSON only."
)
LEVEL_TASK = {
    "WSI": "Write a low-power caption (3-5 sentences) of this whole-slide image.",
    "ROI": (
        "Write a caption (2-4 sentences) of this region of the slide. Relate it to the slide-level "
        "description given as context."
    ),
    "patch": (
        "Write a caption (2-3 sentences) of this field of view. Relate it to the region-level "
        "description given as context."
    ),
}
REPLY_FORMAT = (
    'Also rewrite the answer to each item in "items" (keep its meaning; you may rephrase the question). '
    'Return one JSON object: {"caption": "...", "items": [{"id": "...", "question": "...", "answer": "..."}]} '
    "with exactly one entry per item id."
)
_GRADE = re.compile(r"\bgrade\s*([1-9])\b", re.I)
_QUOTE = 300


class ChainReplyError(ServiceError):
    """An LLM reply cannot be used for a unit."""


@dataclass
class ChainReport:
    """What the LLM pass did."""

    model: str
    units: int = 0
    rewritten: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "units": self.units,
            "rewritten": self.rewritten,
            "failed": len(self.failures),
            **self.stats,
        }


def _text_records(unit: Unit) -> list[VQARecord]:
    return [r for r in unit.records if r.format in TEXT_FORMATS and r.format != "caption"]


def unit_messages(unit: Unit, context: str | None) -> list[dict[str, str]]:
    """The request for one unit: task, level-above caption, facts, drafts."""
    payload = {
        "level": unit.level,
        "context_from_level_above": context,
        "facts": unit.facts.as_prompt(),
        "caption_draft": unit.caption.answer,
        "items": [{"id": r.id, "question": r.question, "draft_answer": r.answer} for r in _text_records(unit)],
    }
    text = f"{LEVEL_TASK[unit.level]} {REPLY_FORMAT}\n\nInput:\n{json.dumps(payload, ensure_ascii=False, indent=1)}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def true_grade(unit: Unit) -> int | None:
    """The grade a unit's texts may name, or None when no grade may be named."""
    facts = unit.facts
    if isinstance(facts, SlideFacts):
        return facts.grade if facts.has_tumour else None
    if isinstance(facts, WindowFacts):
        return facts.grade if facts.shows_grade else None
    if isinstance(facts, RegionFacts):
        return facts.grade if facts.composition.tissue["tumour"] > 0 else None
    return None


def parse_unit_reply(unit: Unit, reply: str) -> tuple[str, dict[str, tuple[str | None, str]]]:
    """Caption and ``{id: (question or None, answer)}`` from a reply, validated against ``unit``."""
    try:
        value = parse_json_reply(reply)
    except JudgeReplyError as exc:
        raise ChainReplyError(str(exc)) from None
    if not isinstance(value, dict):
        raise ChainReplyError("expected a JSON object with 'caption' and 'items'")
    caption = value.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ChainReplyError("'caption' is missing or empty")
    wanted = [r.id for r in _text_records(unit)]
    items = value.get("items", [])
    if not isinstance(items, list):
        raise ChainReplyError("'items' must be a list")
    found: dict[str, tuple[str | None, str]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ChainReplyError(f"item {item!r} has no string 'id'")
        rid = item["id"]
        if rid not in wanted:
            raise ChainReplyError(f"unknown item id {rid!r} (asked for {', '.join(wanted)})")
        if rid in found:
            raise ChainReplyError(f"item id {rid!r} appears twice")
        answer, question = item.get("answer"), item.get("question")
        if not isinstance(answer, str) or not answer.strip():
            raise ChainReplyError(f"item {rid!r} has no answer")
        if question is not None and (not isinstance(question, str) or not question.strip()):
            question = None
        found[rid] = (question.strip() if question else None, answer.strip())
    missing = [rid for rid in wanted if rid not in found]
    if missing:
        raise ChainReplyError(f"no answer for item(s) {', '.join(missing)}")
    _check_grades(unit, [caption, *(a for _, a in found.values())])
    return caption.strip(), found


def _check_grades(unit: Unit, texts: Sequence[str]) -> None:
    # The cheapest contradiction to catch, and the most harmful one to let through.
    allowed = true_grade(unit)
    for text in texts:
        for m in _GRADE.finditer(text):
            if allowed is None or int(m.group(1)) != allowed:
                truth = f"grade {allowed}" if allowed is not None else "no grade"
                raise ChainReplyError(f"the reply names grade {m.group(1)} but the truth is {truth}")


def apply_reply(unit: Unit, caption: str, items: dict[str, tuple[str | None, str]], model: str) -> None:
    """Replace the unit's caption and open texts with the model's."""
    meta_extra = {"generator": "llm", "llm_model": model}
    new = []
    for record in unit.records:
        if record.format == "caption":
            record = replace(record, answer=caption, meta={**record.meta, **meta_extra})
        elif record.id in items:
            question, answer = items[record.id]
            record = replace(record, question=question or record.question, answer=answer,
                             meta={**record.meta, **meta_extra})
        new.append(record)
    unit.records = new


def mark_failed(unit: Unit, error: str) -> None:
    """Keep the template texts and say why in their meta."""
    unit.records = [
        replace(r, meta={**r.meta, "llm_error": error}) if r.format in TEXT_FORMATS else r for r in unit.records
    ]


def run_chain(
    units: Sequence[Unit],
    client: LLMClient,
    *,
    on_done: Callable[[int], None] | None = None,
) -> ChainReport:
    """Rewrite the texts of ``units`` level by level (in place); see the module docstring."""
    report = ChainReport(model=client.model, units=len(units))
    captions: dict[str, str] = {}
    by_level = {level: [u for u in units if u.level == level] for level in LEVELS}
    chunk = max(1, 4 * client.max_concurrency)
    before = dict(client.stats)
    for level in LEVELS:
        todo = by_level[level]
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            conversations = [unit_messages(u, captions.get(u.parent) if u.parent else None) for u in batch]
            replies = client.chat_many(conversations)
            for unit, reply in zip(batch, replies):
                try:
                    caption, items = parse_unit_reply(unit, reply)
                except ChainReplyError as exc:
                    quoted = reply if len(reply) <= _QUOTE else reply[:_QUOTE] + "..."
                    report.failures.append(
                        {"unit": unit.key, "level": unit.level, "slide": unit.slide, "error": str(exc), "reply": quoted}
                    )
                    mark_failed(unit, str(exc))
                else:
                    apply_reply(unit, caption, items, client.model)
                    report.rewritten += 1
                captions[unit.key] = unit.caption.answer
            if on_done is not None:
                on_done(len(batch))
    report.stats = {k: client.stats[k] - before.get(k, 0) for k in client.stats}
    return report
