"""CONCH v1 (MahmoodLab/CONCH): patch features, prompt embeddings and zero-shot image embeddings.

The architecture comes from the authors' own code (the ``conch-fork`` distribution,
import name ``conch``): its ``conch_ViT-B-16.json`` config and ``CoCa(**cfg)``, built
the way ``conch.open_clip_custom.factory.create_model`` builds it. Their loader is not
used: ``load_checkpoint`` loads with ``strict=False`` and discards the missing and
unexpected keys, so a wrong file would run on random weights, and ``create_model``
wants a string path. We load with :func:`.weights.load_strict` instead.

Three outputs, each as the authors compute it:

* patch features (the tile encoder): ``encode_image(x, proj_contrast=False,
  normalize=False)``, 512-d, the embedding CONCH's authors (and CLAM/TRIDENT) extract;
* prompt embeddings: ``encode_text(tokens)``, projected and L2-normalised, the text
  side of CONCH's zero-shot classifier;
* zero-shot image embeddings: ``encode_image(x)`` (projected, normalised). The patch
  feature is exactly the input of that last projection (``pooled @ proj_contrast``),
  so :meth:`ConchEncoder.project_features` turns stored patch features into zero-shot
  embeddings without re-reading a tile.

Preprocessing is the authors' torchvision pipeline on PIL images (Resize(448, bicubic),
CenterCrop(448), ToTensor, Normalize with the OpenAI CLIP mean/std), per tile, in the
DataLoader workers (:func:`.preset_encoder.preset_transform`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from slidevl.features.encoders.base import EncoderError, files_revision
from slidevl.features.encoders.preset_encoder import PresetEncoder
from slidevl.features.encoders.presets import PRESETS, EncoderPreset
from slidevl.features.encoders.weights import load_strict, read_state_dict

# CONCH's text context is 128 tokens, the last reserved for the class token that
# encode_text appends; the authors tokenise to 127 and pad one <pad> at the end.
CONTEXT_LENGTH = 128


def import_conch(preset_name: str = "conch") -> Any:
    """``conch.open_clip_custom``, or an :class:`EncoderError` saying what to install."""
    try:
        from conch import open_clip_custom
    except Exception as exc:  # ImportError, or a broken timm/torchvision underneath
        raise EncoderError(
            f"{preset_name}: the CONCH code could not be imported ({type(exc).__name__}: {exc}); install it with "
            "`pip install conch-fork` (import name `conch`) beside torchvision and timm"
        ) from exc
    return open_clip_custom


def conch_config(architecture: str = "conch_ViT-B-16") -> dict[str, Any]:
    """The model config that ships in the CONCH package (a fresh copy, safe to edit)."""
    occ = import_conch()
    path = Path(occ.factory.CFG_DIR) / f"{architecture}.json"
    if not path.is_file():
        raise EncoderError(f"conch: {path} not found in the installed CONCH package; reinstall conch-fork")
    return json.loads(path.read_text())


def build_conch_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """``CoCa(**cfg)`` with random weights, as CONCH's ``create_model`` builds it before loading."""
    occ = import_conch()
    cfg = copy.deepcopy(dict(cfg))
    cfg.pop("custom_text", None)  # create_model pops it too: CoCa takes no such argument
    return occ.CoCa(**cfg)


def conch_tokenizer() -> Any:
    """The authors' tokenizer (byte-level BPE, uncased) from the CONCH package."""
    return import_conch().get_tokenizer()


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(N, 128)`` exactly as ``conch.open_clip_custom.tokenize`` makes them.

    CONCH's ``tokenize`` calls ``tokenizer.batch_encode_plus``, which transformers 5
    removed (``AttributeError: TokenizersBackend has no attribute batch_encode_plus``).
    For a list of strings ``tokenizer(...)`` is the same call with the same arguments,
    so this reproduces it: 127 tokens with <start_of_text>/<end_of_text>, padded, and one
    <pad> appended as the placeholder for the class token.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise EncoderError("conch: texts must be a list of strings")
    tokens = tokenizer(
        list(texts),
        max_length=CONTEXT_LENGTH - 1,
        add_special_tokens=True,
        return_token_type_ids=False,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return torch.nn.functional.pad(tokens["input_ids"], (0, 1), value=tokenizer.pad_token_id)


class ConchEncoder(PresetEncoder):
    """CONCH v1 from a local folder or weight file (see module docstring).

    ``model_cfg`` replaces the packaged config (tests build a reduced model with it); it
    enters the revision, so features of a modified architecture never pass for CONCH's.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        preset: EncoderPreset = PRESETS["conch"],
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        if preset.library != "conch":
            raise EncoderError(f"{preset.name} is a {preset.library} preset, not a CONCH one")
        self.model_cfg = copy.deepcopy(dict(model_cfg)) if model_cfg is not None else conch_config(preset.architecture)
        self._tokenizer: Any = None
        super().__init__(preset, path, device=device)
        if model_cfg is not None:
            self.revision = files_revision([self.weight_file], extra={"preset": preset.describe(), "model_cfg": self.model_cfg})

    def _build_and_load(self) -> torch.nn.Module:
        state = read_state_dict(self.weight_file, self.preset.name)
        model = build_conch_model(self.model_cfg)
        load_strict(model, state, self.weight_file, self.preset.name)
        return model

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)

    def _require_model(self) -> None:
        if self.model is None:
            raise EncoderError(f"{self.name}: this is a worker copy without the model; use the main-process encoder")

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``: the temperature CONCH's zero-shot classifier multiplies cosines by."""
        self._require_model()
        return float(self.model.logit_scale.detach().exp().cpu())

    @property
    def feature_projection(self) -> np.ndarray:
        """``(512, 512)`` matrix taking a patch feature to the (unnormalised) contrastive image embedding."""
        self._require_model()
        return self.model.visual.proj_contrast.detach().float().cpu().numpy()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CONCH token ids for ``texts`` (see :func:`tokenize`)."""
        if self._tokenizer is None:
            self._tokenizer = conch_tokenizer()
        return tokenize(self._tokenizer, texts)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised prompt embeddings ``(N, 512)``: ``model.encode_text(tokens)``."""
        self._require_model()
        if not texts:
            return np.zeros((0, self.feature_dim), np.float32)
        tokens = self.tokenize(texts).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float().cpu().numpy()

    def encode_image_zeroshot(self, transformed: torch.Tensor) -> np.ndarray:
        """Zero-shot image embeddings ``(B, 512)`` of a :meth:`worker_transform` batch: ``encode_image(x)``."""
        self._require_model()
        x = torch.as_tensor(transformed).to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            return self.model.encode_image(x).float().cpu().numpy()

    def project_features(self, features: np.ndarray) -> np.ndarray:
        """Zero-shot embeddings of stored patch features: ``normalize(f @ proj_contrast)``.

        The same numbers :meth:`encode_image_zeroshot` gives for the tiles the features
        came from, since ``encode_image`` ends with exactly this projection.
        """
        self._require_model()
        f = torch.as_tensor(np.asarray(features, np.float32)).to(self.device)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise EncoderError(f"{self.name}: expected patch features (N, {self.feature_dim}), got {tuple(f.shape)}")
        with torch.inference_mode():
            z = f @ self.model.visual.proj_contrast.float()
            return torch.nn.functional.normalize(z, dim=-1).cpu().numpy()

    def provenance(self) -> dict[str, Any]:
        record = super().provenance()
        record["kind"] = "conch"
        record["embedding"] = "encode_image(x, proj_contrast=False, normalize=False)"
        record["model_cfg"] = self.model_cfg
        return record
