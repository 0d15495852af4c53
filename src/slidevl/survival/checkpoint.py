"""Fold checkpoints: ``model.safetensors`` (weights and buffers) plus ``config.json``.

The config holds everything needed to rebuild and use the model without the training
data: the model's own init arguments, the survival bin edges (months), how region
tokens were made, the feature encoder, and for HiLa the prompt texts. Weights are
safetensors, so loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.errors import CheckpointError
from slidevl.survival.models.base import SurvivalModel
from slidevl.survival.registry import model_from_config

__all__ = ["CONFIG", "WEIGHTS", "CheckpointError", "load_checkpoint", "save_checkpoint"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(directory: str | Path, model: SurvivalModel, meta: dict[str, Any]) -> Path:
    """Write the weights and ``{"model": model.config, **meta}`` into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": model.name})
    write_json_atomic(directory / CONFIG, {"model": model.config, **meta})
    return directory


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[SurvivalModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder in eval mode; return it with the full config."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: no {name}; pass a fold folder written by `slidevl survival cv` (RUN/fold_k)")
    config = json.loads((directory / CONFIG).read_text())
    try:
        model = model_from_config(config["model"])
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    except (KeyError, TypeError) as exc:
        # A config from another slidevl version: a renamed, missing or extra architecture setting.
        raise CheckpointError(
            f"{directory}/{CONFIG} does not describe a model this slidevl can build ({type(exc).__name__}: {exc}); "
            "load it with the slidevl version that wrote it"
        ) from exc
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS), device=device))
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not match config.json ({exc})") from exc
    return model.to(device).eval(), config
