"""Save and load a topo-pack encoder: ``encoder.safetensors`` + ``encoder_config.json``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slidevl.atomic import atomic_path
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.model import TopoPackEncoder

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder_config.json"


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file atomically (contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_encoder(encoder: TopoPackEncoder, directory: str | Path) -> Path:
    """Write the encoder's weights and config into ``directory``; returns the directory."""
    directory = Path(directory)
    save_state_dict(encoder.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt", "model": "TopoPackEncoder"})
    encoder.config.save(directory / CONFIG_NAME)
    return directory


def load_encoder(directory: str | Path, map_location: str | torch.device = "cpu") -> TopoPackEncoder:
    """Rebuild a :class:`TopoPackEncoder` from :func:`save_encoder` output (no unpickling)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; is {directory} a topo-pack encoder checkpoint?")
    encoder = TopoPackEncoder(TopoPackConfig.load(cfg_path))
    state = load_file(str(w_path), device=str(map_location))
    encoder.load_state_dict(state, strict=True)
    return encoder.to(map_location)
