"""Survival models by name: listing them, building one, and rebuilding one from its saved config.

Importing this module registers every model shipped with slidevl in
:data:`SURVIVAL_MODELS` (the registry itself lives in :mod:`.models.base`, so the
model modules can register without importing this one). Adding a model is one
decorated class; see ``docs/adding-a-model.md``.
"""

from __future__ import annotations

from typing import Any, Mapping

# Imported for their registrations, baselines first: the import order is the listing order.
import slidevl.survival.models.mil  # noqa: F401  (meanpool, abmil)
import slidevl.survival.models.transmil  # noqa: F401  (transmil)
import slidevl.survival.hila.model  # noqa: F401  (hila)
from slidevl.errors import CheckpointError
from slidevl.survival.hila.prompts import EncodedPrompts
from slidevl.survival.models.base import SURVIVAL_MODELS, SurvivalModel

__all__ = ["SURVIVAL_MODELS", "build_model", "list_survival_models", "model_from_config"]


def list_survival_models() -> list[str]:
    """Every registered survival model name, in registration order."""
    return SURVIVAL_MODELS.names()


def build_model(
    name: str,
    *,
    in_dim: int,
    region_dim: int,
    n_bins: int,
    options: Mapping[str, Any] | None = None,
    prompts: Mapping[str, EncodedPrompts] | None = None,
) -> SurvivalModel:
    """A fresh model ``name``; models that read prompts (``needs_prompts``) need the encoded ``prompts``."""
    return SURVIVAL_MODELS.get(name).build(in_dim=in_dim, region_dim=region_dim, n_bins=n_bins, options=options, prompts=prompts)


def model_from_config(config: Mapping[str, Any]) -> SurvivalModel:
    """An untrained model with the architecture recorded in ``config`` (weights loaded separately)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in SURVIVAL_MODELS:
        raise CheckpointError(
            f"the checkpoint names survival model {name!r}, which this slidevl does not have; known: "
            f"{', '.join(list_survival_models())}. Load it with the slidevl version (or plugin) that wrote it"
        )
    return SURVIVAL_MODELS.get(name).from_config(config)
