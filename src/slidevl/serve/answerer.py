"""Who answers the chat: the :class:`Answerer` protocol, its request types and its errors.

The app takes any object with ``name`` and ``answer(slide_id, question, bbox, history)``.
Two are built in, each in its own module on top of this one: the tuned slide VQA model
(:class:`slidevl.serve.vqa.SlideLLMAnswerer`, loaded by ``--vqa-checkpoint``) and, without
a checkpoint, :class:`slidevl.serve.jobfacts.JobFactsAnswerer`, which measures what the
job folder already knows. The page says which answerer is in use.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

from slidevl.errors import CheckpointError, InputError

BBox = tuple[int, int, int, int]
History = Sequence[Mapping[str, str]]


@runtime_checkable
class Answerer(Protocol):
    """Answers a question about a slide, or about a level-0 rectangle of it."""

    name: str

    def answer(self, slide_id: str, question: str, bbox: BBox | None, history: History) -> str:
        """Return the answer text. ``history`` holds earlier turns as ``{"role", "content"}``."""
        ...


class AnswererUnavailableError(CheckpointError):
    """A VQA checkpoint was given but no model can be loaded from it."""


class AnswerError(InputError):
    """The answerer cannot answer this request; the message tells the user why (HTTP 422)."""
