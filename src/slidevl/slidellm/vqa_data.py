"""VQA records → chat-formatted, tokenised training examples for the slide LLM.

A record becomes a two-turn chat::

    user:       <image>\\n{question}[\\nA. option\\nB. option ...]
    assistant:  {answer}            (option letters such as "B" or "A,C" for choice formats)

Choice options are part of the user text, exactly as a user of ``slidevl ask`` types them.
The chat is rendered with the tokenizer's own chat template; labels are -100 everywhere
except the assistant's tokens (the answer and the template's end-of-turn marker, so the
model learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from slidevl.slidellm.model import IGNORE_INDEX
from slidevl.slidellm.tokenizer import IMAGE_TOKEN, TokenizerError
from slidevl.vqa.records import VQARecord, render_options

#: Which record formats each tuning stage learns from.
STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "warmup": ("single", "multi", "open", "caption"),
    "stage1": ("caption",),
    "stage2": ("single", "multi", "open"),
}


def user_prompt(record: VQARecord) -> str:
    """The user turn of a record: placeholder, question, and lettered options for choice formats."""
    lines = [IMAGE_TOKEN, record.question.strip()]
    if record.is_choice:
        lines += render_options(record.options)
    return "\n".join(lines)


def chat_messages(record: VQARecord) -> list[dict[str, str]]:
    """The record as chat messages (user question, assistant answer)."""
    return [{"role": "user", "content": user_prompt(record)}, {"role": "assistant", "content": record.answer}]


def corpus_texts(records: Iterable[VQARecord]) -> list[str]:
    """Every text the embedded tokenizer should know: questions, options, answers."""
    texts: list[str] = []
    for r in records:
        texts.append(user_prompt(r).replace(IMAGE_TOKEN, ""))
        texts.append(r.answer)
    return texts


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a whole chat and labels that keep only the assistant turns.

    Each assistant turn's span is found by rendering the chat up to that turn with the
    generation prompt (the prefix) and with the turn (the whole); the tokens in between
    are the turn. This works with any chat template whose rendering of a conversation
    starts with the rendering of its beginning, which is checked.
    """
    messages = list(messages)
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if upto[: len(prefix)] != prefix or ids[: len(upto)] != upto:
            raise TokenizerError(
                "the chat template does not render a conversation as an extension of its beginning, so the "
                "assistant tokens cannot be located; use a template without history-dependent rewriting"
            )
        labels[len(prefix) : len(upto)] = upto[len(prefix) :]
    return ids, labels


@dataclass
class Example:
    """One tokenised record; ``labels`` is -100 outside the supervised tokens."""

    record: VQARecord
    input_ids: list[int]
    labels: list[int]


def select_records(records: Iterable[VQARecord], stage: str) -> list[VQARecord]:
    """The records a stage trains on (see :data:`STAGE_FORMATS`)."""
    if stage not in STAGE_FORMATS:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGE_FORMATS)}")
    return [r for r in records if r.format in STAGE_FORMATS[stage]]


class ChatDataset(Dataset):
    """Tokenised VQA records, tokenised once up front (QA text is small).

    ``supervise="answer"`` keeps labels on the assistant turn only (tuning stages);
    ``supervise="all"`` trains on every token of the chat (the embedded LLM's language
    warm-up, where the model must learn the question language as well).
    ``max_tokens`` truncates from the end; a truncated answer loses its end-of-turn token.
    """

    def __init__(
        self,
        records: Sequence[VQARecord],
        tokenizer: PreTrainedTokenizerBase,
        *,
        supervise: str = "answer",
        max_tokens: int = 1024,
    ) -> None:
        if supervise not in ("answer", "all"):
            raise ValueError(f"supervise must be 'answer' or 'all', got {supervise!r}")
        if not records:
            raise ValueError("no records to train on; check the record file and the formats the stage uses")
        self.examples: list[Example] = []
        for record in records:
            ids, labels = encode_chat(tokenizer, chat_messages(record))
            if supervise == "all":
                labels = list(ids)
            self.examples.append(Example(record, ids[:max_tokens], labels[:max_tokens]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class ChatBatch:
    """A right-padded batch plus what the visual side needs to build each row's tokens."""

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    labels: Tensor  # (B, L)
    slides: list[str]
    bboxes: list[tuple[int, int, int, int] | None]
    ids: list[str]

    def to(self, device: torch.device | str) -> "ChatBatch":
        return ChatBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.slides, self.bboxes, self.ids
        )


class ChatCollator:
    """Pads :class:`Example` lists into a :class:`ChatBatch` (right padding)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[Example]) -> ChatBatch:
        length = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e.labels)
        return ChatBatch(
            ids,
            mask,
            labels,
            [e.record.slide for e in examples],
            [e.record.bbox for e in examples],
            [e.record.id for e in examples],
        )
