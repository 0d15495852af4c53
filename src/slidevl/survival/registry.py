"""Model names → classes, and rebuilding a model from its saved config."""

from __future__ import annotations

from typing import Any

import torch

from slidevl.survival.hila.model import HiLa
from slidevl.survival.hila.prompts import EncodedPrompts
from slidevl.survival.models.base import SurvivalModel
from slidevl.survival.models.mil import ABMIL, MeanPoolMIL
from slidevl.survival.models.transmil import TransMIL

MODELS: dict[str, type[SurvivalModel]] = {cls.name: cls for cls in (MeanPoolMIL, ABMIL, TransMIL, HiLa)}


def build_model(
    name: str,
    *,
    in_dim: int,
    region_dim: int,
    n_bins: int,
    options: dict[str, Any] | None = None,
    prompts: dict[str, EncodedPrompts] | None = None,
) -> SurvivalModel:
    """Instantiate a model; HiLa also needs the encoded ``{"patch": ..., "region": ...}`` prompts."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(MODELS)}")
    options = dict(options or {})
    if name != "hila":
        return MODELS[name](in_dim=in_dim, n_bins=n_bins, **options)
    if prompts is None:
        raise ValueError("HiLa needs encoded prompts (see slidevl.survival.hila.prompts.encode_bank)")
    return HiLa(
        in_dim=in_dim,
        region_dim=region_dim,
        n_bins=n_bins,
        patch_prompts=torch.from_numpy(prompts["patch"].embeddings),
        patch_prompt_mask=torch.from_numpy(prompts["patch"].mask),
        region_prompts=torch.from_numpy(prompts["region"].embeddings),
        region_prompt_mask=torch.from_numpy(prompts["region"].mask),
        **options,
    )


def model_from_config(config: dict[str, Any]) -> SurvivalModel:
    """An untrained model with the architecture recorded in ``config`` (weights loaded separately).

    HiLa's prompt embeddings are buffers: they are created empty here and filled by the
    checkpoint's state dict, so prediction needs no text encoder.
    """
    config = dict(config)
    name = config.pop("name")
    if name not in MODELS:
        raise ValueError(f"checkpoint names unknown model {name!r}; known: {sorted(MODELS)}")
    if name == "hila":
        shapes = config.pop("prompt_shape")
        for scale in ("patch", "region"):
            config[f"{scale}_prompts"] = torch.zeros(shapes[scale])
            config[f"{scale}_prompt_mask"] = torch.ones(shapes[scale][:2], dtype=torch.bool)
    return MODELS[name](**config)
