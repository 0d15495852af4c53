"""Slide in, answer out: load a tuned checkpoint, open a slide, hold a conversation.

A slide is either a slide *file* (features are computed on first use with
``slidevl.features.pipeline.preprocess`` into a cache job, with the same preprocessing
settings the checkpoint was trained on) or the *id* of a slide in an existing job.
The topo-pack encoder runs once per slide; its output is cached next to the features.

A :class:`Conversation` keeps the chat history in the tokenizer's template. The first
question carries the ``<image>`` placeholder; changing the region (``bbox``) adds a new
placeholder to the next question, holding the summary tokens of the packs under the box
(plus the global token), while the earlier turns keep theirs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console

from slidevl.features.store import FeatureStore, read_slide_attrs
from slidevl.qa.records import OPTION_LETTERS, VQARecord
from slidevl.slidellm.answers import assistant_answer
from slidevl.slidellm.llm import LLMLoadOptions
from slidevl.slidellm.model import BBox, SlideVLMError, VisualInput, VisualTokens
from slidevl.slidellm.tokenizer import IMAGE_TOKEN
from slidevl.slidellm.tuning.checkpoint import LoadedVLM, load_vlm
from slidevl.slidellm.tuning.visual import CachedVisuals
from slidevl.slidellm.vqa_data import ChatCollator, Example, chat_messages, encode_chat, user_prompt

#: Where features of slides given as files are kept when no --job is passed.
DEFAULT_ASK_JOB = Path("~/.cache/slidevl/ask")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preprocess_config_from_attrs(attrs: dict[str, Any], *, workers: int | None = None) -> Any:
    """Rebuild the ``PreprocessConfig`` a feature file was made with, from its provenance.

    The pipeline stores everything that decides a feature file under ``config_fingerprint``;
    a new slide preprocessed with the same values yields features the checkpoint understands.
    """
    from slidevl.features.config import PreprocessConfig
    from slidevl.slide.tissue import TissueParams
    from slidevl.tiling.grid import GridSpec

    fp = attrs.get("config_fingerprint")
    if not isinstance(fp, dict):
        raise SlideVLMError(
            "the checkpoint's training features carry no preprocessing record (config_fingerprint), e.g. because "
            "they were imported; preprocess the slide yourself with the same settings and pass its id with --job"
        )
    execution = {} if workers is None else {"workers": workers}
    return PreprocessConfig(
        **execution,
        grid=GridSpec(**fp["grid"]),
        # Stores written before adipose recovery existed carry no such key: they were segmented without it.
        tissue=TissueParams(**{"adipose_radius_um": 0.0, **fp["tissue"]}),
        min_tissue=float(fp["min_tissue"]),
        encoder=str(attrs.get("encoder_spec") or fp["encoder"]),
        region_encoder=str(fp["region_encoder"]),
        pack_features=bool(fp["pack_features"]),
        global_feature=bool(fp["global_feature"]),
        float16=bool(fp["float16"]),
        progress=False,
    )


#: Fingerprint entries that describe the slide file, not the preprocessing settings.
_PER_SLIDE_ENTRIES = ("mpp", "slide_bytes")


def _settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k not in _PER_SLIDE_ENTRIES}


def _features_made_for(path: Path, job: Path, training_attrs: dict[str, Any]) -> FeatureStore | None:
    """The store of ``job`` when it holds complete features of ``path`` made with the training settings.

    A second question about a slide file then skips the preprocessing pipeline, whose
    imports (OpenSlide, the tile encoder and its weights) cost more than the answer. Only
    a sure match is taken: anything else (a moved or changed file, other settings, a
    killed run) goes to the pipeline, which decides and records as usual.
    """
    from slidevl.features.jobs import complete_status, slide_id_of, slide_statuses

    slide_id = slide_id_of(path)
    trained = training_attrs.get("config_fingerprint")
    # A job may hold several encoders' records of the slide: the one made like the training data counts.
    candidates = [s for s in slide_statuses(job, slide_id) if isinstance(s.fingerprint, dict) and isinstance(trained, dict)
                  and _settings(s.fingerprint) == _settings(trained)]
    status = candidates[-1] if candidates else None
    if status is None or status.output is None or status.slide.path != str(path.resolve()):
        return None
    feature_file = job / status.output
    if complete_status(job, slide_id, feature_file, status.fingerprint, path) is None:
        return None
    return FeatureStore(job, feature_file.parent.name)


class SlideAssistant:
    """A tuned checkpoint ready to answer questions about slides."""

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: torch.device | str | None = None,
        llm_options: LLMLoadOptions | None = None,
        preprocess_workers: int | None = None,
        cache_root: str | Path = DEFAULT_ASK_JOB,
    ) -> None:
        """Load ``checkpoint``.

        ``preprocess_workers`` sets the tile-reading processes for slide files (pipeline
        default when None); encoder outputs are cached under ``cache_root``.
        """
        self.preprocess_workers = preprocess_workers
        self.cache_root = Path(cache_root).expanduser()
        self.device = torch.device(device) if device is not None else default_device()
        self.loaded: LoadedVLM = load_vlm(checkpoint, device=self.device, llm_options=llm_options)
        self._visuals: dict[str, CachedVisuals] = {}

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def forget_slides(self) -> None:
        """Drop the visual tokens held in memory: the next ``open_slide`` reads the disk cache again.

        That cache is checked against the feature file, so a process that stays up (the
        warm model of ``slidevl ask``) sees a slide whose features were recomputed since.
        """
        self._visuals.clear()

    def _visuals_for(self, store: FeatureStore) -> CachedVisuals:
        key = str(store.root.resolve())
        if key not in self._visuals:
            # One cache folder per feature folder, so equal slide ids of different jobs never meet.
            folder = self.cache_root / "visual_cache" / hashlib.sha1(key.encode()).hexdigest()[:12]
            self._visuals[key] = CachedVisuals(self.loaded.encoder, store, folder, device=self.device)
        return self._visuals[key]

    def _training_attrs(self) -> dict[str, Any]:
        config = self.loaded.config
        if config.job is None or config.feature_encoder is None:
            raise SlideVLMError(f"{self.loaded.directory}: the checkpoint records no training feature job")
        store = FeatureStore(config.job, config.feature_encoder)
        ids = store.slide_ids()
        if not ids:
            raise SlideVLMError(
                f"{store.root}: the checkpoint's training features are gone, so the preprocessing settings for a new "
                "slide are unknown; preprocess the slide yourself and pass its id with --job"
            )
        return read_slide_attrs(store.path(ids[0]))

    def _preprocess(self, path: Path, job: Path, console: Console | None) -> FeatureStore:
        attrs = self._training_attrs()
        done = _features_made_for(path, job, attrs)
        if done is not None:
            return done
        from slidevl.features.pipeline import preprocess

        config = preprocess_config_from_attrs(attrs, workers=self.preprocess_workers)
        report = preprocess(path, job, config, console=console or Console(stderr=True, quiet=True))
        failed = [r for r in report.results if r.status == "failed"]
        if failed:
            raise SlideVLMError(f"{path}: preprocessing failed: {failed[0].error}")
        return FeatureStore(job, report.feature_dir.name)

    @staticmethod
    def _recorded_slide(job: Path, slide_id: str, slides_root: str | Path | None) -> Path | None:
        from slidevl.features.jobs import recorded_slide
        from slidevl.features.slidepaths import SlideFileError

        try:
            return recorded_slide(job, slide_id, Path(slides_root) if slides_root else None)
        except SlideFileError as exc:
            raise SlideVLMError(f"{slide_id} has no features in {job} and they cannot be computed: {exc}") from exc

    def open_slide(self, slide: str | os.PathLike[str], *, job: str | Path | None = None, console: Console | None = None,
                   slides_root: str | Path | None = None) -> VisualTokens:
        """Visual tokens of a slide file or DICOM folder (preprocessed on first use) or of a slide id in ``job``.

        Without ``job``, a slide id is looked up in the checkpoint's training job and a
        slide file is preprocessed into the cache root (``~/.cache/slidevl/ask``). A slide
        id the job records but holds no features for (never completed, or marked by
        ``slidevl job check --fix``) is preprocessed from its recorded file, looked for
        first in ``slides_root`` when the slides moved.
        """
        from slidevl.slide.formats import is_slide_path

        path = Path(slide).expanduser()
        if is_slide_path(path):  # a slide file, or a DICOM slide's folder
            from slidevl.features.jobs import slide_id_of

            job_dir = Path(job).expanduser() if job is not None else self.cache_root
            store = self._preprocess(path, job_dir, console)
            slide_id = slide_id_of(path)
        else:
            slide_id = str(slide)
            job_dir = Path(job).expanduser() if job is not None else Path(self.loaded.config.job or ".")
            encoder = self.loaded.config.feature_encoder
            root = job_dir / "features"
            store = FeatureStore(job_dir, encoder if encoder and (root / encoder).is_dir() else None)
            recorded = None if slide_id in store else self._recorded_slide(job_dir, slide_id, slides_root)
            if recorded is not None:
                store = self._preprocess(recorded, job_dir, console)
            elif slide_id not in store:
                raise SlideVLMError(
                    f"{slide}: neither a slide file nor a slide id with features in {store.root}; pass the slide "
                    "file, or the job holding its features with --job"
                )
        return self._visuals_for(store).get(slide_id)

    def conversation(self, visual: VisualTokens, *, bbox: BBox | None = None) -> "Conversation":
        """A new chat about ``visual``, optionally about the region ``bbox``."""
        conversation = Conversation(self, visual)
        conversation.set_region(bbox)
        return conversation

    def answer_records(
        self,
        records: Sequence[VQARecord],
        visuals: dict[str, VisualTokens],
        *,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        rank_single: bool = False,
    ) -> list[str]:
        """Single-turn answers to records (prompted exactly as in training), batched.

        ``rank_single`` answers each single-choice record with the option whose answer the
        model finds most likely (written as in training), instead of free generation; a
        free answer can name a concept that is not among the options.
        """
        answers: dict[int, str] = {}
        if rank_single:
            for i, r in enumerate(records):
                if r.format == "single":
                    answers[i] = self.rank_options(r, visuals[r.slide])
        model, tok = self.loaded.model, self.loaded.tokenizer
        todo = [i for i in range(len(records)) if i not in answers]
        for start in range(0, len(todo), batch_size):
            chunk = [records[i] for i in todo[start : start + batch_size]]
            encoded = [
                tok.apply_chat_template([{"role": "user", "content": user_prompt(r)}], add_generation_prompt=True, return_dict=True)[
                    "input_ids"
                ]
                for r in chunk
            ]
            images = [[model.visual_input(visuals[r.slide], r.bbox).to(self.device)] for r in chunk]
            answers.update(zip(todo[start : start + batch_size], self._generate(encoded, images, max_new_tokens)))
        return [answers[i] for i in range(len(records))]

    def rank_options(self, record: VQARecord, visual: VisualTokens) -> str:
        """The answer to a single-choice ``record`` that the model scores highest, in its training style."""
        if record.format != "single":
            raise SlideVLMError(f"record {record.id!r}: only single-choice questions are answered by ranking")
        style = self.loaded.config.answer_style
        candidates = [replace(record, answer=OPTION_LETTERS[i]) for i in range(len(record.options))]
        examples = [Example(c, *encode_chat(self.tokenizer, chat_messages(c, style))) for c in candidates]
        batch = ChatCollator(self.tokenizer.pad_token_id)(examples).to(self.device)
        model = self.loaded.model
        image = model.visual_input(visual, record.bbox).to(self.device)
        scores = model.answer_log_likelihood(batch.input_ids, batch.attention_mask, batch.labels, image)
        return assistant_answer(candidates[int(scores.argmax())], style)

    def _generate(self, encoded: list[list[int]], images: list[list[VisualInput]], max_new_tokens: int) -> list[str]:
        tok = self.loaded.tokenizer
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        out = self.loaded.model.generate(
            ids.to(self.device), mask.to(self.device), images, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id
        )
        return [tok.decode(row, skip_special_tokens=True).strip() for row in out]


@dataclass
class Conversation:
    """A multi-turn chat about one slide; the history stays in the chat template."""

    assistant: SlideAssistant
    visual: VisualTokens
    bbox: BBox | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[VisualInput] = field(default_factory=list)
    _region_changed: bool = True

    def set_region(self, bbox: BBox | None) -> None:
        """Ask the following questions about ``bbox`` (None: the whole slide)."""
        if bbox is not None:
            # Fail now, on the command, rather than on the next question.
            self.visual.select(bbox)
        self.bbox = bbox
        self._region_changed = True

    def ask(self, question: str, *, max_new_tokens: int = 128) -> str:
        """Answer ``question`` (greedy decoding) and append both turns to the history."""
        question = question.strip()
        if not question:
            raise SlideVLMError("empty question")
        if IMAGE_TOKEN in question:
            raise SlideVLMError(f"questions cannot contain {IMAGE_TOKEN}; it marks where the slide goes")
        model = self.assistant.loaded.model
        images = list(self.images)
        content = question
        if self._region_changed:
            images.append(model.visual_input(self.visual, self.bbox).to(self.assistant.device))
            content = f"{IMAGE_TOKEN}\n{question}"
        messages = [*self.messages, {"role": "user", "content": content}]
        tok = self.assistant.tokenizer
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        limit = getattr(model.llm.config, "max_position_embeddings", None)
        n_visual = sum(
            model.connector.output_length(img.tokens.shape[0], 0 if img.patches is None else img.patches.shape[0])
            for img in images
        )
        if limit is not None and len(ids) + n_visual + max_new_tokens > limit:
            raise SlideVLMError(
                f"the conversation no longer fits the LLM's {limit} positions; start a new one (/reset) or ask for fewer tokens"
            )
        answer = self.assistant._generate([list(ids)], [images], max_new_tokens)[0]
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images = images
        self._region_changed = False
        return answer

    def reset(self) -> None:
        """Forget the history; the region stays."""
        self.messages, self.images, self._region_changed = [], [], True


def ask(
    slide: str | os.PathLike[str],
    question: str,
    *,
    checkpoint: str | Path,
    bbox: BBox | None = None,
    job: str | Path | None = None,
    max_new_tokens: int = 128,
    device: torch.device | str | None = None,
    cache_root: str | Path = DEFAULT_ASK_JOB,
) -> str:
    """One question about one slide, from a slide file or slide id to an answer."""
    assistant = SlideAssistant(checkpoint, device=device, cache_root=cache_root)
    conversation = assistant.conversation(assistant.open_slide(slide, job=job), bbox=bbox)
    return conversation.ask(question, max_new_tokens=max_new_tokens)
