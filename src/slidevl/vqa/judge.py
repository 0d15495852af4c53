"""LLM judge for open answers and captions, in the WSI-P style.

For every open/caption record, two deterministic (temperature 0) requests:

1. the judge splits the *ground-truth* answer into atomic claims (a JSON list);
2. it scores each claim against the prediction: 1 fully supported, 0.7 mostly,
   0.3 partially or vaguely, 0 absent or contradicted (a JSON list of numbers).

The record's score is the mean claim score. Claims come from the reference, not
from the prediction, so a long answer cannot earn credit by saying more. An
empty prediction supports nothing and scores 0 without a request.

Replies are parsed leniently (code fences, ``<think>`` blocks and text around the
JSON are ignored); a reply that still cannot be read gives a record with
``score=None`` and an ``error`` that names the step and quotes the reply, and the
evaluation goes on.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from slidevl.errors import ServiceError
from slidevl.llmclient import LLMClient
from slidevl.qa.records import TEXT_FORMATS, VQARecord

CLAIM_SCORES: tuple[float, ...] = (1.0, 0.7, 0.3, 0.0)

CLAIMS_SYSTEM = (
    "You are a meticulous pathologist grading answers about histopathology slides. "
    "Reply with JSON only."
)
CLAIMS_INSTRUCTION = (
    "Split the reference answer below into atomic factual claims: short, self-contained statements that "
    "can each be checked on their own (one finding, grade, location or diagnosis per claim). Keep the "
    "reference's meaning, do not add facts, and skip filler. Return a JSON array of strings."
)
SCORING_INSTRUCTION = (
    "Score how well the candidate answer supports each claim taken from the reference answer. Use exactly "
    "one of these scores per claim: 1 = fully supported, 0.7 = mostly supported, 0.3 = partially or vaguely "
    "supported, 0 = absent or contradicted. Judge meaning, not wording. Return a JSON array of numbers, one "
    "per claim, in the order of the claims."
)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_QUOTE = 200


class JudgeReplyError(ServiceError):
    """A judge reply holds no usable JSON."""


@dataclass
class JudgeResult:
    """The judge's verdict on one record; ``score`` is None when ``error`` is set."""

    id: str
    score: float | None
    claims: list[str] = field(default_factory=list)
    claim_scores: list[float] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def claims_messages(question: str, reference: str) -> list[dict[str, str]]:
    """Step 1 request: extract claims from the reference answer."""
    payload = json.dumps({"question": question, "reference_answer": reference}, ensure_ascii=False)
    return [
        {"role": "system", "content": CLAIMS_SYSTEM},
        {"role": "user", "content": f"{CLAIMS_INSTRUCTION}\n\nInput:\n{payload}"},
    ]


def scoring_messages(question: str, claims: Sequence[str], prediction: str) -> list[dict[str, str]]:
    """Step 2 request: score every claim against the candidate answer."""
    payload = json.dumps(
        {"question": question, "claims": list(claims), "candidate_answer": prediction}, ensure_ascii=False
    )
    return [
        {"role": "system", "content": CLAIMS_SYSTEM},
        {"role": "user", "content": f"{SCORING_INSTRUCTION}\n\nInput:\n{payload}"},
    ]


def parse_json_reply(reply: str) -> Any:
    """The first JSON array or object in an LLM reply.

    Tries a fenced block first, then the first ``[`` or ``{`` from which a JSON
    value decodes; text after the value is ignored.
    """
    text = _THINK.sub(" ", reply)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, char in enumerate(candidate):
            if char not in "[{":
                continue
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            return value
    raise JudgeReplyError("no JSON array or object in the reply")


def parse_claims(reply: str) -> list[str]:
    """Claims from a step-1 reply: a list of strings (or of ``{"claim": ...}``)."""
    value = parse_json_reply(reply)
    if isinstance(value, dict):
        value = value.get("claims")
    if not isinstance(value, list):
        raise JudgeReplyError("expected a JSON array of claim strings")
    claims = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("claim")
        if not isinstance(item, str):
            raise JudgeReplyError(f"claim {item!r} is not a string")
        if item.strip():
            claims.append(item.strip())
    if not claims:
        raise JudgeReplyError("the reply lists no claims")
    return claims


def parse_scores(reply: str, n_claims: int) -> list[float]:
    """Claim scores from a step-2 reply: one of 1, 0.7, 0.3, 0 per claim, in order."""
    value = parse_json_reply(reply)
    if isinstance(value, dict):
        value = value.get("scores")
    if not isinstance(value, list):
        raise JudgeReplyError("expected a JSON array of claim scores")
    scores = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("score")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise JudgeReplyError(f"score {item!r} is not a number") from None
        allowed = [s for s in CLAIM_SCORES if abs(s - number) < 1e-6]
        if not allowed:
            raise JudgeReplyError(f"score {item!r} is not one of {', '.join(f'{s:g}' for s in CLAIM_SCORES)}")
        scores.append(allowed[0])
    if len(scores) != n_claims:
        raise JudgeReplyError(f"expected {n_claims} scores (one per claim), got {len(scores)}")
    return scores


def judge_records(
    records: Sequence[VQARecord], predictions: Mapping[str, str], client: LLMClient
) -> list[JudgeResult]:
    """Judge every open/caption record (others are ignored); results in record order."""
    targets = [r for r in records if r.format in TEXT_FORMATS]
    missing = [r.id for r in targets if r.id not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} judged record(s): {', '.join(missing[:5])}")
    claim_replies = client.chat_many([claims_messages(r.question, r.answer) for r in targets])

    results: dict[str, JudgeResult] = {}
    to_score: list[tuple[VQARecord, list[str]]] = []
    for record, reply in zip(targets, claim_replies):
        try:
            claims = parse_claims(reply)
        except JudgeReplyError as exc:
            results[record.id] = JudgeResult(record.id, None, error=_reply_error("claim extraction", exc, reply))
            continue
        if not predictions[record.id].strip():
            results[record.id] = JudgeResult(record.id, 0.0, claims, [0.0] * len(claims))
        else:
            to_score.append((record, claims))

    score_replies = client.chat_many(
        [scoring_messages(r.question, claims, predictions[r.id]) for r, claims in to_score]
    )
    for (record, claims), reply in zip(to_score, score_replies):
        try:
            scores = parse_scores(reply, len(claims))
        except JudgeReplyError as exc:
            results[record.id] = JudgeResult(
                record.id, None, claims, error=_reply_error("claim scoring", exc, reply)
            )
            continue
        results[record.id] = JudgeResult(record.id, sum(scores) / len(scores), claims, scores)
    return [results[r.id] for r in targets]


def _reply_error(step: str, exc: Exception, reply: str) -> str:
    quoted = reply if len(reply) <= _QUOTE else reply[:_QUOTE] + "..."
    return f"unusable judge reply at {step}: {exc}; reply was {quoted!r}"
