"""Text towers that embed prompts, and in which space the embeddings live.

``get_text_encoder(spec)`` returns an object with ``encode(texts) -> (N, D)``
(L2-normalised rows) and ``space``, the name of the embedding space:

* ``minilm`` (HiLa's default) and ``clip:/text_tower_dir``: sentence embeddings in a
  space of their own (``space`` is the spec). A model that compares them with patch
  features needs a learned bridge. They are HiLa's encoders
  (:func:`slidevl.survival.hila.prompts.encode_texts`), reused here, not re-implemented.
* ``conch:PATH`` (or ``conch`` once registered) and ``openclip:DIR`` /
  ``openclip:ARCH@CKPT``: the text tower of the vision-language model whose image tower
  made the patch features. Prompts land in that model's image-text space, the space
  its own zero-shot classifier uses, so no bridge is needed. ``space`` is
  ``"<encoder name>:<revision>"``, the same name and revision the feature files record,
  so a mismatch between prompts and features is caught (:meth:`AlignedTextEncoder.check_features`).

An aligned encoder also says how stored patch features enter that space
(:attr:`AlignedTextEncoder.feature_projection`): CONCH stores the embedding before its
last projection (as its authors extract features), open_clip stores the projected one.
"""

from __future__ import annotations

import abc
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from slidevl.features.encoders.base import EncoderError, TileEncoder

ALIGNED_KINDS = ("conch", "openclip")
SENTENCE_SPECS = ("minilm", "clip:/path/to/text_tower")


class TextEncoder(abc.ABC):
    """Prompts in, one L2-normalised row per prompt out."""

    space: str
    dim: int
    aligned: bool = False

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, dim)`` float32 embeddings, each row of unit length."""


class SentenceTextEncoder(TextEncoder):
    """HiLa's own text encoders (``minilm``, ``clip:DIR``): a space of their own."""

    def __init__(self, spec: str) -> None:
        from slidevl.survival.hila.prompts import encode_texts, normalise_encoder_spec

        self.space = normalise_encoder_spec(spec)
        self._encode = encode_texts
        self.dim = int(self.encode(["probe"]).shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(list(texts), self.space)


class AlignedTextEncoder(TextEncoder):
    """The text tower of a vision-language tile encoder (see module docstring)."""

    aligned = True
    image_encoder: TileEncoder
    feature_projection: np.ndarray  # (feature_dim, dim): stored patch feature -> image embedding
    logit_scale: float  # the model's exp(logit_scale): zero-shot logits are logit_scale * cosine

    def __init__(self, image_encoder: TileEncoder) -> None:
        self.image_encoder = image_encoder
        self.space = f"{image_encoder.name}:{image_encoder.revision}"

    def image_embeddings(self, features: np.ndarray) -> np.ndarray:
        """Unit-length image embeddings ``(N, dim)`` of stored patch features, comparable with :meth:`encode`."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_projection.shape[0]:
            raise EncoderError(
                f"{self.space}: patch features of shape {features.shape} do not come from this encoder "
                f"(expected (N, {self.feature_projection.shape[0]}))"
            )
        z = features @ self.feature_projection
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def check_features(self, attrs: Mapping[str, Any], source: str) -> None:
        """Fail unless a feature file's provenance names this encoder, revision and dimension."""
        enc = self.image_encoder
        name, revision, dim = attrs.get("encoder"), attrs.get("encoder_revision"), attrs.get("feature_dim")
        if name != enc.name or revision != enc.revision:
            raise EncoderError(
                f"{source}: the patch features come from encoder {name!r} (revision {revision!r}), but the prompts are "
                f"embedded by {enc.name!r} (revision {enc.revision!r}); prompts and features must share one model. "
                f"Re-run `slidevl preprocess --encoder <the same spec>` or pass the text encoder of the model "
                "that made the features"
            )
        if dim is not None and int(dim) != self.feature_projection.shape[0]:
            raise EncoderError(
                f"{source}: {dim}-d patch features, but {enc.name} image features are "
                f"{self.feature_projection.shape[0]}-d; re-run `slidevl preprocess` for this slide"
            )


class ConchTextEncoder(AlignedTextEncoder):
    """CONCH's text tower: ``encode_text`` on CONCH tokens; features projected by ``proj_contrast``."""

    def __init__(self, encoder: Any) -> None:
        super().__init__(encoder)
        self.feature_projection = encoder.feature_projection
        self.dim = int(self.feature_projection.shape[1])
        self.logit_scale = encoder.logit_scale

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.image_encoder.encode_text(list(texts))


class OpenCLIPTextEncoder(AlignedTextEncoder):
    """An open_clip model's text tower; its tile features are already ``encode_image`` outputs."""

    def __init__(self, encoder: Any) -> None:
        super().__init__(encoder)
        self.tokenizer = _openclip_tokenizer(encoder.model_name, encoder.path)
        self.feature_projection = np.eye(encoder.feature_dim, dtype=np.float32)
        self.dim = encoder.feature_dim
        self.logit_scale = float(encoder.model.logit_scale.detach().exp().cpu())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self.image_encoder.model
        tokens = self.tokenizer(list(texts)).to(self.image_encoder.device)
        with torch.inference_mode():
            emb = model.encode_text(tokens).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


def _openclip_tokenizer(model_name: str, path: Path) -> Any:
    """open_clip's tokenizer for ``model_name``, refusing any that would be downloaded.

    Built-in architectures with open_clip's own BPE vocabulary need nothing from the
    network; tokenizers named by ``hf_tokenizer_name`` (and SigLIP's) come from the hub
    unless a ``local-dir:`` folder holds them.
    """
    import open_clip

    cfg = open_clip.get_model_config(model_name) or {}
    text_cfg = cfg.get("text_cfg", {}) if isinstance(cfg, dict) else {}
    hf_name = text_cfg.get("hf_tokenizer_name")
    local = model_name.startswith("local-dir:")
    if hf_name and not (local and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
        where = f"{path} holds no tokenizer.json" if local else f"{model_name} uses the hub tokenizer {hf_name!r}"
        raise EncoderError(
            f"openclip:{path}: {where}; nothing is downloaded. Save the tokenizer into the model folder "
            "(`AutoTokenizer.from_pretrained(name).save_pretrained(folder)`) and use openclip:FOLDER"
        )
    if not hf_name and not local and "siglip" in model_name.lower():
        raise EncoderError(f"openclip:{path}: {model_name} uses a SigLIP tokenizer from the hub; nothing is downloaded")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return open_clip.get_tokenizer(model_name)


def is_aligned_spec(spec: str) -> bool:
    """Whether ``spec`` names a vision-language model's text tower (``conch...``, ``openclip:...``)."""
    return spec.strip().partition(":")[0].lower() in ALIGNED_KINDS


@functools.lru_cache(maxsize=4)
def get_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """The text encoder named by ``spec`` (see module docstring); loaded once per process."""
    spec = spec.strip()
    if not is_aligned_spec(spec):
        return SentenceTextEncoder(spec)
    from slidevl.features.encoders.conch import ConchEncoder
    from slidevl.features.encoders.openclip import OpenCLIPEncoder
    from slidevl.features.encoders.registry import get_encoder

    encoder = get_encoder(spec, device=device)
    if isinstance(encoder, ConchEncoder):
        return ConchTextEncoder(encoder)
    if isinstance(encoder, OpenCLIPEncoder):
        return OpenCLIPTextEncoder(encoder)
    raise EncoderError(f"text encoder {spec!r} has no text tower; use conch:PATH, openclip:... or one of {SENTENCE_SPECS}")


def class_embeddings(text: Any, prompt_sets: Sequence[Sequence[str]]) -> np.ndarray:
    """``(C, D)`` unit class embeddings: the renormalised mean of each class's prompt embeddings.

    ``text`` is an aligned text tower (:mod:`slidevl.features.encoders.text`), whose
    prompt embeddings are unit rows; one call encodes every prompt.
    """
    flat = [t for group in prompt_sets for t in group]
    emb = np.asarray(text.encode(flat), np.float32)
    out, row = [], 0
    for group in prompt_sets:
        mean = emb[row : row + len(group)].mean(axis=0)
        out.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        row += len(group)
    return np.stack(out).astype(np.float32)


def class_probabilities(image_embeddings: np.ndarray, classes: np.ndarray, logit_scale: float) -> np.ndarray:
    """``softmax(logit_scale · cosine)`` over classes, ``(N, C)``; inputs are unit rows."""
    logits = logit_scale * (np.asarray(image_embeddings, np.float64) @ np.asarray(classes, np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
