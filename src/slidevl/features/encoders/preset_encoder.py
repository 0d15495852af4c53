"""The tile encoder behind every named preset: weights found, loaded strictly, fed as the authors do.

:class:`PresetEncoder` owns what all presets share: locating the weight file
(:mod:`.weights`), the authors' preprocessing (:class:`.transforms.AuthorTransform`),
the pooling rule (:data:`.presets.Pooling`), the revision hash, provenance, and the
check that the loaded model's output has the preset's dimension. Subclasses build the
architecture with its own library (:mod:`.timm_presets`, :mod:`.hf_presets`,
:mod:`.conch`) and return its token sequence or pooled output.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidevl.features.encoders.base import EncoderError, NetworkTileEncoder, files_revision, resolve_device, source_path
from slidevl.features.encoders.presets import EncoderPreset
from slidevl.features.encoders.transforms import AuthorTransform
from slidevl.features.encoders.weights import find_weight_file


def preset_transform(preset: EncoderPreset) -> AuthorTransform:
    """The preprocessing a preset's authors run, as a picklable batch transform."""
    return AuthorTransform(
        resize=preset.resize,
        crop=preset.input_size,
        mean=preset.mean,
        std=preset.std,
        interpolation=preset.interpolation,
    )


class PresetEncoder(NetworkTileEncoder):
    """A named foundation model loaded from a local path (see module docstring)."""

    def __init__(self, preset: EncoderPreset, path: str | Path, *, device: str = "cpu") -> None:
        self.preset = preset
        self.path = Path(path).expanduser()
        self.weight_file = find_weight_file(self.path, preset.name, preset.weight_files)
        self.device = resolve_device(device)
        self.model = self._build_and_load().eval().to(self.device)
        self.transform = preset_transform(preset)
        self.input_size = preset.input_size
        self.name = preset.name
        self.feature_dim = preset.feature_dim
        self.revision = files_revision([self.weight_file], extra=preset.describe())
        probe = self.transform(np.zeros((1, self.input_size, self.input_size, 3), np.uint8))
        with torch.inference_mode():
            dim = int(self._embed(probe.to(self.device)).shape[-1])
        if dim != preset.feature_dim:
            raise EncoderError(
                f"{preset.name}: the model loaded from {self.weight_file} gives {dim}-d features, the preset expects "
                f"{preset.feature_dim}; is this the {preset.name} checkpoint?"
            )

    @abc.abstractmethod
    def _build_and_load(self) -> torch.nn.Module:
        """The architecture, built by its own library, with :attr:`weight_file` loaded strictly."""

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "source": source_path(self.weight_file),
            "kind": "preset",
            "preset": self.preset.describe(),
            "transform": self.transform.as_dict(),
        }


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """One row per image from a ``(B, T, D)`` token sequence, by the preset's pooling rule.

    ``cls+mean_patch`` skips every prefix token (the class token and any registers), so
    Virchow2's four registers never enter the patch mean.
    """
    if tokens.ndim == 2:
        return tokens
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "cls+mean_patch":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    raise EncoderError(f"pooling {pooling!r} does not apply to a token sequence")
