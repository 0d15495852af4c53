"""Presets whose architecture timm builds: UNI, UNI2-h, Virchow(2), GigaPath, H-optimus, Kaiko.

The model is ``timm.create_model(preset.architecture, pretrained=False, **preset.kwargs)``,
the constructor each model card gives, with layer classes named by strings in the
preset resolved here. Nothing is fetched: ``pretrained=False`` builds random weights,
which the local checkpoint then replaces in full (:func:`.weights.load_strict`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import torch

from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.preset_encoder import PresetEncoder, pool_tokens
from slidevl.features.encoders.presets import EncoderPreset
from slidevl.features.encoders.weights import load_strict, read_state_dict


def resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Replace dotted class names (``"torch.nn.SiLU"``) by the classes they name."""
    resolved: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str) and "." in value:
            module, _, attr = value.rpartition(".")
            resolved[key] = getattr(importlib.import_module(module), attr)
        else:
            resolved[key] = value
    return resolved


def build_timm_model(preset: EncoderPreset, **overrides: Any) -> torch.nn.Module:
    """The preset's architecture with random weights (tests and benchmarks start here too)."""
    import timm

    try:
        return timm.create_model(preset.architecture, pretrained=False, **resolve_kwargs({**preset.kwargs, **overrides}))
    except Exception as exc:  # unknown model name or kwargs in this timm release
        raise EncoderError(
            f"{preset.name}: timm {timm.__version__} could not build {preset.architecture} ({type(exc).__name__}: {exc}); "
            "install timm>=1.0.17"
        ) from exc


def checkpoint_img_size(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> int | None:
    """The image size a checkpoint's position embedding was trained for, when it differs from the model's.

    Some ports store the embedding for 518 px although the model card feeds 224 px; with
    ``dynamic_img_size`` timm interpolates it at run time either way, so the grid is
    taken from the file. Returns None when the shapes already agree or cannot be read.
    """
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape or pos.ndim != 3:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix:
        return None
    patch = model.patch_embed.patch_size
    return side * int(patch[0] if isinstance(patch, (tuple, list)) else patch)


class TimmPresetEncoder(PresetEncoder):
    """A timm-built preset; ``kwargs`` updates the constructor (e.g. ``depth=2`` in tests)."""

    def __init__(self, preset: EncoderPreset, path: Any, *, device: str = "cpu") -> None:
        if preset.library != "timm":
            raise EncoderError(f"{preset.name} is a {preset.library} preset, not a timm one")
        self.img_size_from_file: int | None = None
        super().__init__(preset, path, device=device)

    def _build_and_load(self) -> torch.nn.Module:
        state = read_state_dict(self.weight_file, self.preset.name)
        model = build_timm_model(self.preset)
        img_size = checkpoint_img_size(state, model) if self.preset.kwargs.get("dynamic_img_size") else None
        if img_size is not None:
            self.img_size_from_file = img_size
            model = build_timm_model(self.preset, img_size=img_size)
        load_strict(model, state, self.weight_file, self.preset.name)
        return model

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.model(x), self.preset.pooling, int(getattr(self.model, "num_prefix_tokens", 1)))

    def provenance(self) -> dict[str, Any]:
        record = super().provenance()
        if self.img_size_from_file is not None:
            record["img_size_from_checkpoint"] = self.img_size_from_file
        return record
