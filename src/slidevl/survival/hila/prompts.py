"""The prompt bank, and how its prompts are embedded for HiLa.

A prompt bank is a JSON file with one entry per risk level, ordered from the
shortest-survival bin (highest risk) to the longest (lowest risk); each level holds
several attribute descriptions at patch level and at region level::

    {"name": "...", "description": "...",
     "levels": [{"label": "...", "patch": ["...", ...], "region": ["...", ...]}, ...]}

Banks for the synthetic cohort and for TCGA BRCA, LUAD and UCEC ship in
``slidevl/survival/prompts/``; pass a path to use an edited copy.

The text encoders (:mod:`slidevl.features.encoders.text`) are frozen, so prompts are
embedded once per run and the embeddings travel with the model (a buffer in its
checkpoint); nothing is re-encoded per step.

``minilm`` (the default) and ``clip:DIR`` embed prompts in a space of their own, which
HiLa bridges to the patch features with a learned projection. ``conch:PATH`` and
``openclip:...`` use the text tower of the vision-language model that made the patch
features, so prompts and features share one space and HiLa needs no bridge
(:func:`text_space_options`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidevl.errors import InputError
from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.text import DEFAULT_TEXT_ENCODER, encode_texts, get_text_encoder, is_aligned_spec

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"


class PromptError(InputError):
    """A prompt bank or text encoder cannot be used."""


@dataclass(frozen=True)
class PromptBank:
    """Risk-level labels and the patch- and region-level prompts of each level."""

    name: str
    labels: tuple[str, ...]
    patch: tuple[tuple[str, ...], ...]
    region: tuple[tuple[str, ...], ...]
    source: str = ""

    @property
    def n_levels(self) -> int:
        return len(self.labels)

    def scale(self, level: str) -> tuple[tuple[str, ...], ...]:
        if level not in ("patch", "region"):
            raise ValueError(f"prompt scale must be 'patch' or 'region', got {level!r}")
        return getattr(self, level)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "levels": [
                {"label": label, "patch": list(p), "region": list(r)}
                for label, p, r in zip(self.labels, self.patch, self.region)
            ],
        }


def available_banks() -> list[str]:
    """Names of the prompt banks shipped with slidevl."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.json"))


def bank_from_dict(data: dict, source: str = "<dict>") -> PromptBank:
    """Build and check a :class:`PromptBank` from its JSON structure."""
    levels = data.get("levels") if isinstance(data, dict) else None
    if not isinstance(levels, list) or len(levels) < 2:
        raise PromptError(f"{source}: a prompt bank needs a 'levels' list with at least two risk levels")
    labels, patch, region = [], [], []
    for i, level in enumerate(levels):
        for scale in ("patch", "region"):
            texts = level.get(scale) if isinstance(level, dict) else None
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise PromptError(f"{source}: level {i} needs a non-empty '{scale}' list of prompt strings")
        labels.append(str(level.get("label", f"level {i}")))
        patch.append(tuple(t.strip() for t in level["patch"]))
        region.append(tuple(t.strip() for t in level["region"]))
    return PromptBank(str(data.get("name", Path(source).stem)), tuple(labels), tuple(patch), tuple(region), source)


def load_prompt_bank(spec: str | Path) -> PromptBank:
    """Load a shipped bank by name (``synthetic``, ``brca``, ``luad``, ``ucec``) or a JSON path."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = PROMPT_DIR / f"{spec}.json"
        if not path.is_file():
            raise PromptError(f"unknown prompt bank {spec!r}; use one of {available_banks()} or a path to a JSON file")
    if not path.is_file():
        raise PromptError(f"{path}: prompt file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path}: not valid JSON ({exc})") from exc
    return bank_from_dict(data, str(path))


def _aligned_encoder(spec: str) -> Any:
    """The vision-language text tower of an aligned spec, with its errors as :class:`PromptError`."""
    try:
        return get_text_encoder(spec)
    except EncoderError as exc:
        raise PromptError(f"text encoder {spec}: {exc}") from exc


def is_aligned(spec: str) -> bool:
    """Whether ``spec`` embeds prompts in the patch features' own space (``conch:``, ``openclip:``)."""
    return is_aligned_spec(spec)


def text_space_options(spec: str, store: Any) -> tuple[str, dict[str, Any]]:
    """The prompts' embedding space, and the HiLa options that use it.

    For an aligned text encoder every feature file of ``store`` (a
    :class:`~slidevl.features.store.FeatureStore`) must come from the same model and
    revision; HiLa then gets ``text_space`` and the fixed ``feature_projection`` and
    drops its learned text bridge. Other encoders return their spec and no options.
    """
    if not is_aligned(spec):
        return spec, {}
    from slidevl.features.store import read_slide_attrs

    text = _aligned_encoder(spec)
    for slide_id in store.slide_ids():
        path = store.path(slide_id)
        try:
            text.check_features(read_slide_attrs(path), str(path))
        except EncoderError as exc:
            raise PromptError(str(exc)) from exc
    return text.space, {"text_space": text.space, "feature_projection": torch.from_numpy(text.feature_projection)}


@dataclass
class EncodedPrompts:
    """Embeddings of one scale of a bank, padded to (levels, max prompts, T) with a mask."""

    embeddings: np.ndarray  # (L, P, T) float32, zero rows where mask is False
    mask: np.ndarray  # (L, P) bool
    texts: tuple[tuple[str, ...], ...]


def encode_bank(bank: PromptBank, scale: str, encoder: str = DEFAULT_TEXT_ENCODER) -> EncodedPrompts:
    """Embed every prompt of one scale once, laid out per risk level."""
    texts = bank.scale(scale)
    flat = [t for level in texts for t in level]
    emb = encode_texts(flat, encoder)
    n_max = max(len(level) for level in texts)
    out = np.zeros((len(texts), n_max, emb.shape[1]), dtype=np.float32)
    mask = np.zeros((len(texts), n_max), dtype=bool)
    row = 0
    for i, level in enumerate(texts):
        out[i, : len(level)] = emb[row : row + len(level)]
        mask[i, : len(level)] = True
        row += len(level)
    return EncodedPrompts(out, mask, texts)
