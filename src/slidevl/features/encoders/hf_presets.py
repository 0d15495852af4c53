"""Presets whose architecture transformers builds: Phikon (ViT-B/16) and Phikon-v2 (DINOv2 ViT-L).

The folder holds ``config.json`` next to the weights, as the hub ships it. The model
class named by the preset loads it with ``from_pretrained`` (local files only), and any
missing, unexpected or mismatched weight is an error. Phikon's checkpoint carries a
pooler its card discards (``add_pooling_layer=False``): those keys, and only those, may
go unused.
"""

from __future__ import annotations

from typing import Any

import torch

from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.preset_encoder import PresetEncoder, pool_tokens
from slidevl.features.encoders.presets import EncoderPreset


class TransformersPresetEncoder(PresetEncoder):
    """A transformers-built preset (see module docstring)."""

    def __init__(self, preset: EncoderPreset, path: Any, *, device: str = "cpu") -> None:
        if preset.library != "transformers":
            raise EncoderError(f"{preset.name} is a {preset.library} preset, not a transformers one")
        super().__init__(preset, path, device=device)

    def _build_and_load(self) -> torch.nn.Module:
        import transformers

        config_file = self.weight_file.parent / "config.json"
        if not config_file.is_file():
            raise EncoderError(
                f"{self.preset.name}: {self.weight_file.parent} has no config.json next to {self.weight_file.name}; "
                f"pass the folder downloaded from {self.preset.hub_repo}, which ships both"
            )
        model_class = getattr(transformers, self.preset.architecture)
        # from_pretrained, not load_state_dict: transformers renames checkpoint keys saved by
        # older releases (the hub files) to its current module names while loading.
        try:
            model, info = model_class.from_pretrained(
                str(self.weight_file.parent), local_files_only=True, output_loading_info=True, **self.preset.kwargs
            )
        except Exception as exc:  # shape mismatches, unreadable files, configs of another model type
            raise EncoderError(
                f"{self.preset.name}: {self.weight_file} could not be loaded as {self.preset.architecture} "
                f"({type(exc).__name__}: {str(exc)[:300]}); is this the {self.preset.name} checkpoint?"
            ) from exc
        missing = sorted(info.get("missing_keys") or ())
        # The card drops the pooler (add_pooling_layer=False), so its shipped weights go unused.
        unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith("pooler."))
        mismatched = list(info.get("mismatched_keys") or ())
        if missing or unexpected or mismatched:
            raise EncoderError(
                f"{self.preset.name}: {self.weight_file} does not fit the {self.preset.name} architecture "
                f"({self.preset.architecture}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"mismatched {mismatched[:2]}. Is this the {self.preset.name} checkpoint?"
            )
        return model

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.model(pixel_values=x).last_hidden_state, self.preset.pooling, 1)
