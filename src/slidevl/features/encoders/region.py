"""Region encoders: one feature per 4096 px region from its 16 x 16 grid of patch features.

Specs for :func:`get_region_encoder`:

* ``mean`` (default): mean of the patches present in the region;
* ``meanmax``: that mean concatenated with the element-wise max over present patches;
* ``vit:/local/dir``: a ``transformers`` ViT over the patch-feature grid, HIPT style.
  The folder is a ViT saved with ``save_pretrained`` whose config has
  ``patch_size=1``, ``image_size`` = the grid edge (16) and ``num_channels`` = the
  patch feature dimension. Its 1 x 1 patch embedding is then a linear projection of
  each patch feature, its learned position embeddings are the 2D grid positions, and
  the region feature is the final CLS token. Absent patches (background, slide edge)
  are zeroed and masked out of attention, so they cannot influence the result.

Regions with no present patch get a zero feature from ``mean``/``meanmax``.
"""

from __future__ import annotations

import abc
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidevl.features.encoders.base import (
    EncoderError,
    files_revision,
    model_dir_name,
    resolve_device,
    safe_name,
    source_path,
)
from slidevl.features.encoders.hf import check_model_dir, load_pretrained, weight_files
from slidevl.features.encoders.registry import EncoderKind, encoder_kind, parse_spec, spec_forms
from slidevl.registry import Registry

VALID_REGION_VIT = (
    "a folder written by `ViTModel.save_pretrained` with patch_size=1, image_size=16 (the region grid) and "
    "num_channels equal to the patch feature dimension, e.g. vit:/models/region-vit"
)
# Regions per forward pass: bounds memory at 257 tokens each.
_REGION_BATCH = 64


class RegionEncoder(abc.ABC):
    """Maps ``grid (R, G, G, D)`` float32 and ``present (R, G, G)`` bool to ``(R, D')``."""

    name: str
    revision: str

    @abc.abstractmethod
    def output_dim(self, input_dim: int) -> int:
        """Feature dimension produced for patch features of ``input_dim``."""

    @abc.abstractmethod
    def encode(self, grid: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Region features ``(R, output_dim(D))`` float32."""

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision}


def check_grid(grid: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a patch grid and its presence mask."""
    grid = np.asarray(grid, dtype=np.float32)
    present = np.asarray(present, dtype=bool)
    if grid.ndim != 4 or grid.shape[1] != grid.shape[2]:
        raise EncoderError(f"region grid must be (R, G, G, D), got shape {grid.shape}")
    if present.shape != grid.shape[:3]:
        raise EncoderError(f"present mask must be (R, G, G) = {grid.shape[:3]}, got {present.shape}")
    return grid, present


class MeanRegionEncoder(RegionEncoder):
    """Masked mean of the present patch features."""

    name = "mean"
    revision = "v1"

    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def encode(self, grid: np.ndarray, present: np.ndarray) -> np.ndarray:
        grid, present = check_grid(grid, present)
        return _masked_mean(grid, present)


class MeanMaxRegionEncoder(RegionEncoder):
    """Masked mean and masked max of the present patch features, concatenated."""

    name = "meanmax"
    revision = "v1"

    def output_dim(self, input_dim: int) -> int:
        return 2 * input_dim

    def encode(self, grid: np.ndarray, present: np.ndarray) -> np.ndarray:
        grid, present = check_grid(grid, present)
        peak = np.where(present[..., None], grid, -np.inf).max(axis=(1, 2))
        peak[~present.any(axis=(1, 2))] = 0
        return np.concatenate([_masked_mean(grid, present), peak], axis=1).astype(np.float32)


def _masked_mean(grid: np.ndarray, present: np.ndarray) -> np.ndarray:
    count = np.maximum(present.sum(axis=(1, 2)), 1)[:, None]
    total = np.einsum("rhwd,rhw->rd", grid, present.astype(np.float32))
    return (total / count).astype(np.float32)


class ViTRegionEncoder(RegionEncoder):
    """A ``transformers`` ViT over the patch-feature grid (see module docstring)."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu") -> None:
        spec = f"vit:{model_dir}"
        path = check_model_dir(Path(model_dir), spec, VALID_REGION_VIT)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        # A ViT's pooler is unused here; not building it avoids "newly initialised" noise.
        model, info = load_pretrained(path, spec, **({"add_pooling_layer": False} if model_type == "vit" else {}))
        config = model.config
        if getattr(config, "patch_size", None) != 1 or not getattr(config, "num_channels", None):
            raise EncoderError(
                f"{spec}: config has patch_size={getattr(config, 'patch_size', None)}, "
                f"num_channels={getattr(config, 'num_channels', None)}; expected {VALID_REGION_VIT}"
            )
        missing = [k for k in (info.get("missing_keys") or ()) if not k.startswith("pooler.")]
        if missing:
            raise EncoderError(f"{spec}: the checkpoint lacks weights {missing[:3]}; its region features would be random")
        if getattr(getattr(model, "embeddings", None), "cls_token", None) is None:
            raise EncoderError(f"{spec}: {type(model).__name__} has no CLS token; expected {VALID_REGION_VIT}")
        self.path = path
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.grid_size = int(config.image_size)
        self.input_dim = int(config.num_channels)
        self.hidden_size = int(config.hidden_size)
        self._masks = "attention_mask" in inspect.signature(model.forward).parameters
        self.name = "vit-" + safe_name(model_dir_name(path))
        self.revision = files_revision([path / "config.json", *weight_files(path)])

    def output_dim(self, input_dim: int) -> int:
        if input_dim != self.input_dim:
            raise EncoderError(
                f"{self.name}: region ViT at {self.path} expects {self.input_dim}-d patch features, got {input_dim}-d; "
                "use a region encoder trained on this patch encoder's features"
            )
        return self.hidden_size

    def encode(self, grid: np.ndarray, present: np.ndarray) -> np.ndarray:
        grid, present = check_grid(grid, present)
        self.output_dim(grid.shape[-1])
        if grid.shape[1] != self.grid_size:
            raise EncoderError(f"{self.name}: expects a {self.grid_size}x{self.grid_size} patch grid, got {grid.shape[1:3]}")
        out = np.empty((len(grid), self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(grid), _REGION_BATCH):
                g = torch.from_numpy(grid[start : start + _REGION_BATCH]).to(self.device)
                p = torch.from_numpy(present[start : start + _REGION_BATCH]).to(self.device)
                pixels = (g * p[..., None]).permute(0, 3, 1, 2)
                kwargs: dict[str, Any] = {}
                if self._masks:
                    # Token order is [CLS, patches in raster order]; CLS always attends.
                    cls = torch.ones(len(p), 1, dtype=torch.long, device=self.device)
                    kwargs["attention_mask"] = torch.cat([cls, p.flatten(1).long()], dim=1)
                hidden = self.model(pixel_values=pixels, **kwargs).last_hidden_state
                out[start : start + len(g)] = hidden[:, 0].float().cpu().numpy()
        return out

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "source": source_path(self.path),
            "grid_size": self.grid_size,
            "input_dim": self.input_dim,
            "output_dim": self.hidden_size,
            "masks_absent_patches": self._masks,
        }


#: Region encoder kinds, chosen by the spec's part before the colon (as tile encoders are).
REGION_ENCODERS: Registry[EncoderKind] = Registry("region encoder kind")


@encoder_kind("mean", registry=REGION_ENCODERS)
def _mean(path: str, device: str) -> RegionEncoder:
    return MeanRegionEncoder()


@encoder_kind("meanmax", registry=REGION_ENCODERS)
def _meanmax(path: str, device: str) -> RegionEncoder:
    return MeanMaxRegionEncoder()


@encoder_kind("vit", path="/path/to/region_vit_dir", registry=REGION_ENCODERS)
def _vit(path: str, device: str) -> RegionEncoder:
    return ViTRegionEncoder(path, device=device)


def get_region_encoder(spec: str = "mean", *, device: str = "cpu") -> RegionEncoder:
    """Build the region encoder a spec names: ``mean``, ``meanmax`` or ``vit:/local/dir``."""
    parsed = parse_spec(REGION_ENCODERS, spec)
    if parsed is None:
        raise EncoderError(f"unknown region encoder {spec!r}; choose one of {available_region_encoders()}")
    kind, path = parsed
    return kind.build(path, device)


def available_region_encoders() -> list[str]:
    """The region encoder spec forms :func:`get_region_encoder` understands."""
    return spec_forms(REGION_ENCODERS)
