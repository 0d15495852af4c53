"""VQA records → chat-formatted, tokenised training examples for the slide LLM.

A record becomes a two-turn chat::

    user:       <image>\\n{question}[\\nA. option\\nB. option ...]
    assistant:  {answer}            (choice formats: see :data:`ANSWER_STYLES`)

Choice options are part of the user text, exactly as a user of ``slidevl ask`` types them.
The stored gold answer of a choice record is its letters (``"B"``, ``"A,C"``); what the
model is trained to *say* is set by the answer style. ``"text"`` (the default) writes the
chosen options' texts (``"fibrous stroma"``, ``"tumour, necrosis"``); the evaluation still
scores by letter (:func:`slidevl.vqa.choices.parse_choice` maps a restated option text to
its letter). A small LM trained from scratch cannot both read the image and find the
option's position in one token: the letter-first styles (``"B"``, ``"B. fibrous
stroma"``) left it at the answer prior, while the option text is the visual concept
itself, a per-template classification (see ``benchmarks/results/vqa_ablations.md``).
The chat is rendered with the tokenizer's own chat template; labels are -100 everywhere
except the assistant's tokens (the answer and the template's end-of-turn marker, so the
model learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from slidevl.errors import InputError
from slidevl.qa.records import OPTION_LETTERS, VQARecord, parse_answer_letters, render_options
from slidevl.slidellm.answers import DEFAULT_ANSWER_STYLE, assistant_answer
from slidevl.slidellm.model import IGNORE_INDEX
from slidevl.slidellm.tokenizer import IMAGE_TOKEN, TokenizerError

#: Which record formats each tuning stage learns from.
STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "warmup": ("single", "multi", "open", "caption"),
    "represent": ("caption",),
    "stage1": ("caption",),
    "stage2": ("single", "multi", "open"),
}


def user_prompt(record: VQARecord) -> str:
    """The user turn of a record: placeholder, question, and lettered options for choice formats."""
    lines = [IMAGE_TOKEN, record.question.strip()]
    if record.is_choice:
        lines += render_options(record.options)
    return "\n".join(lines)


def chat_messages(record: VQARecord, answer_style: str = DEFAULT_ANSWER_STYLE) -> list[dict[str, str]]:
    """The record as chat messages (user question, assistant answer in ``answer_style``)."""
    return [
        {"role": "user", "content": user_prompt(record)},
        {"role": "assistant", "content": assistant_answer(record, answer_style)},
    ]


def corpus_texts(records: Iterable[VQARecord], answer_style: str = DEFAULT_ANSWER_STYLE) -> list[str]:
    """Every text the embedded tokenizer should know: questions, options, answers."""
    texts: list[str] = []
    for r in records:
        texts.append(user_prompt(r).replace(IMAGE_TOKEN, ""))
        texts.append(assistant_answer(r, answer_style))
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


def shuffle_options(record: VQARecord, rng: np.random.Generator) -> VQARecord:
    """The choice record with its options in a random order and the answer letters moved along.

    The option order of a template record is arbitrary, so this is a label-preserving
    augmentation: the same question about the same image, the same chosen option texts.
    Non-choice records are returned unchanged.
    """
    if not record.is_choice:
        return record
    gold = {OPTION_LETTERS.index(x) for x in parse_answer_letters(record.answer, len(record.options))}
    order = rng.permutation(len(record.options)).tolist()
    options = tuple(record.options[i] for i in order)
    answer = ",".join(OPTION_LETTERS[new] for new, old in enumerate(order) if old in gold)
    return replace(record, options=options, answer=answer)


def _peer_key(record: VQARecord) -> tuple[str, str, str]:
    return record.level, str(record.meta.get("template", record.category)), record.format


class ChatDataset(Dataset):
    """Tokenised VQA records (tokenised up front unless the records change per epoch).

    ``supervise="answer"`` keeps labels on the assistant turn only (tuning stages);
    ``supervise="all"`` trains on every token of the chat (the embedded LLM's language
    warm-up, where the model must learn the question language as well).
    ``max_tokens`` truncates from the end; a truncated answer loses its end-of-turn token.

    Two per-epoch views of the records (drawn from ``(seed, epoch, index)``, so a resumed
    run sees the same data; the loop calls :meth:`set_epoch`):

    * ``shuffle_options``: choice options in a fresh random order each epoch (see
      :func:`shuffle_options`). Without it a model can learn each training record's
      letter from its option order, i.e. by heart, instead of from the image.
    * ``blind_answers`` (the text-only warm-up): every answer is replaced by the answer
      of a random training record of the same level, template and format, and choice
      answers pick random options (as many as that peer chose). The LM learns the
      question and answer language and the answer formats, but not which answer goes
      with which record: that can only come from the image, in stages 1 and 2.
    """

    def __init__(
        self,
        records: Sequence[VQARecord],
        tokenizer: PreTrainedTokenizerBase,
        *,
        supervise: str = "answer",
        max_tokens: int = 1024,
        answer_style: str = DEFAULT_ANSWER_STYLE,
        shuffle_options: bool = False,
        blind_answers: bool = False,
        seed: int = 0,
    ) -> None:
        if supervise not in ("answer", "all"):
            raise ValueError(f"supervise must be 'answer' or 'all', got {supervise!r}")
        if not records:
            raise InputError("no records to train on; check the record file and the formats the stage uses")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.supervise = supervise
        self.max_tokens = max_tokens
        self.answer_style = answer_style
        self.shuffle = shuffle_options
        self.blind = blind_answers
        self.seed = int(seed)
        self.epoch = 0
        self._peers: dict[tuple[str, str, str], list[int]] = {}
        for i, r in enumerate(self.records):
            self._peers.setdefault(_peer_key(r), []).append(i)
        self.examples: list[Example] = [] if self.varies else [self._encode(r) for r in self.records]

    @property
    def varies(self) -> bool:
        """Whether the records change from epoch to epoch."""
        return self.blind or (self.shuffle and any(r.is_choice for r in self.records))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _encode(self, record: VQARecord) -> Example:
        ids, labels = encode_chat(self.tokenizer, chat_messages(record, self.answer_style))
        if self.supervise == "all":
            labels = list(ids)
        return Example(record, ids[: self.max_tokens], labels[: self.max_tokens])

    def view(self, index: int) -> VQARecord:
        """Record ``index`` as it is trained on in the current epoch."""
        record = self.records[index]
        if not self.varies:
            return record
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.blind:
            peers = self._peers[_peer_key(record)]
            peer = self.records[peers[int(rng.integers(len(peers)))]]
            if record.is_choice:
                k = min(len(parse_answer_letters(peer.answer, len(peer.options))), len(record.options))
                picked = sorted(rng.choice(len(record.options), size=k, replace=False).tolist())
                record = replace(record, answer=",".join(OPTION_LETTERS[i] for i in picked))
            else:
                record = replace(record, answer=peer.answer)
        if self.shuffle:
            record = shuffle_options(record, rng)
        return record

    def __len__(self) -> int:
        return len(self.records)

    def text_lengths(self) -> list[int]:
        """Each record's token count as the first epoch sees it (later views reorder options, about as long)."""
        return [len(self[i].input_ids) for i in range(len(self))]

    def __getitem__(self, index: int) -> Example:
        if self.examples:
            return self.examples[index]
        return self._encode(self.view(index))


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
