"""The slide VQA model as the chat's :class:`~slidevl.serve.answerer.Answerer`.

Wraps :class:`slidevl.slidellm.ask.SlideAssistant` (a tuned checkpoint from
``slidevl slidellm stage2``). One :class:`~slidevl.slidellm.ask.Conversation` is kept per
slide so follow-up questions see the earlier turns, as in ``slidevl ask --interactive``;
the page's history is authoritative, so when it no longer matches (a reload, another
tab) the conversation starts afresh. Generation is serialised: the model is not
re-entrant and the API runs requests in a thread pool.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from slidevl.errors import SlideVLError
from slidevl.serve.answerer import Answerer, AnswerError, AnswererUnavailableError, BBox, History


class SlideLLMAnswerer:
    """Answers with a tuned slide VQA checkpoint over the slides of one job."""

    name = "slidellm"

    def __init__(self, checkpoint: str | Path, job_dir: str | Path, *, device: str | None = None,
                 max_new_tokens: int = 256, slides_root: str | Path | None = None) -> None:
        from slidevl.slidellm.ask import SlideAssistant

        self.checkpoint = Path(checkpoint)
        self.job_dir = Path(job_dir)
        self.slides_root = slides_root
        self.max_new_tokens = max_new_tokens
        self.assistant = SlideAssistant(self.checkpoint, device=device)
        self.description = f"slide VQA model from {self.checkpoint.name} ({self.assistant.device})"
        self._conversations: dict[str, Any] = {}
        self._lock = threading.Lock()

    def answer(self, slide_id: str, question: str, bbox: BBox | None, history: History) -> str:
        from slidevl.slidellm.model import SlideVLMError

        with self._lock:
            try:
                chat = self._conversations.get(slide_id)
                if chat is None:
                    chat = self.assistant.conversation(self.assistant.open_slide(slide_id, job=self.job_dir, slides_root=self.slides_root))
                    self._conversations[slide_id] = chat
                if len(chat.messages) != len(history):
                    chat.reset()
                wanted = tuple(bbox) if bbox else None
                if wanted != (tuple(chat.bbox) if chat.bbox else None):
                    chat.set_region(wanted)
                return chat.ask(question, max_new_tokens=self.max_new_tokens)
            except SlideVLMError as exc:
                raise AnswerError(str(exc)) from exc


def load_checkpoint_answerer(checkpoint: str | Path, job_dir: str | Path, *, device: str | None = None,
                             slides_root: str | Path | None = None) -> Answerer:
    """The slide VQA model of a ``slidevl slidellm stage2`` checkpoint, answering over ``job_dir``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise AnswererUnavailableError(f"{checkpoint}: VQA checkpoint not found; pass the folder `slidevl slidellm stage2` wrote")
    try:
        return SlideLLMAnswerer(checkpoint, job_dir, device=device, slides_root=slides_root)
    # Our own errors, and what torch and transformers raise for a folder they cannot load.
    except (SlideVLError, OSError, ValueError) as exc:
        raise AnswererUnavailableError(f"{checkpoint}: cannot load the VQA model ({exc})") from exc
