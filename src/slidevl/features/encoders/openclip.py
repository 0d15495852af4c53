"""``openclip:`` adapter for open_clip / CONCH-style vision-language checkpoints.

Spec forms (nothing is downloaded):

* ``openclip:/local/dir``: a folder with ``open_clip_config.json`` (its ``model_cfg``
  and ``preprocess_cfg``) and the weights, the layout open_clip itself reads with
  ``local-dir:``;
* ``openclip:ARCH@/local/checkpoint.pt``: a checkpoint file for a built-in open_clip
  architecture such as ``ViT-B-16``.

The model is built with ``open_clip.create_model_and_transforms(model_name,
pretrained=local_path)``; features are ``model.encode_image`` (projected, not
L2-normalised). open_clip's own preprocessing uses torchvision and PIL per image, so
the worker transform re-creates it from the model's ``preprocess_cfg`` in torch.

open_clip imports torchvision at import time, and torchvision only imports beside the
torch release it was built for; when that fails the adapter says so and how to fix it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidevl.features.encoders.base import (
    EncoderError,
    NetworkTileEncoder,
    files_revision,
    resolve_device,
    safe_name,
    source_path,
)
from slidevl.features.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD, ResizeNormalize
from slidevl.features.encoders.weights import WEIGHT_SUFFIXES

OPENCLIP_CONFIG = "open_clip_config.json"
VALID_OPENCLIP = (
    f"a folder holding {OPENCLIP_CONFIG} and the weights (openclip:/models/conch), or an architecture and a "
    "checkpoint file (openclip:ViT-B-16@/models/vit_b16.pt)"
)


def import_open_clip(spec: str) -> Any:
    """Import open_clip or raise an :class:`EncoderError` explaining the torchvision requirement."""
    try:
        import open_clip
    except Exception as exc:  # ImportError, or RuntimeError from a mismatched torchvision
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "open_clip"
        cause = "open_clip is not installed" if missing else f"open_clip failed to import ({type(exc).__name__}: {exc})"
        raise EncoderError(
            f"{spec}: {cause}. open_clip requires torchvision, and torchvision only imports beside the torch it "
            f"was built for: install open-clip-torch together with the torchvision release matching torch "
            f"{torch.__version__} (pip install open-clip-torch 'torchvision==<the match for torch "
            f"{torch.__version__.split('+')[0]}>'), or export the vision tower to a transformers folder and use "
            "an hf: encoder"
        ) from exc
    return open_clip


def parse_openclip_spec(rest: str) -> tuple[str | None, Path]:
    """Split ``[ARCH@]PATH`` into the architecture name (or None) and the path."""
    arch, sep, path = rest.partition("@")
    if sep and arch and "/" not in arch and "\\" not in arch:
        return arch, Path(path).expanduser()
    return None, Path(rest).expanduser()


class OpenCLIPEncoder(NetworkTileEncoder):
    """The image tower of an open_clip model (see module docstring)."""

    def __init__(self, rest: str, *, device: str = "cpu") -> None:
        spec = f"openclip:{rest}"
        arch, path = parse_openclip_spec(rest)
        if not rest or not path.exists():
            raise EncoderError(f"{spec}: {path} does not exist; expected {VALID_OPENCLIP}. Nothing is downloaded.")
        if path.is_dir():
            if not (path / OPENCLIP_CONFIG).is_file():
                raise EncoderError(f"{spec}: {path} has no {OPENCLIP_CONFIG}; expected {VALID_OPENCLIP}")
            model_name, pretrained = f"local-dir:{path}", None
            files = [p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json")]
            # open_clip only warns and keeps random weights when the folder has none.
            if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
                raise EncoderError(
                    f"{spec}: {path} holds {OPENCLIP_CONFIG} but no weights ({', '.join(WEIGHT_SUFFIXES)}); "
                    "put the checkpoint (e.g. open_clip_model.safetensors) next to it"
                )
            label = path.name
        else:
            if arch is None:
                raise EncoderError(f"{spec}: a checkpoint file needs its architecture; expected {VALID_OPENCLIP}")
            model_name, pretrained = arch, str(path)
            files = [path]
            label = f"{arch}-{path.stem}"
        open_clip = import_open_clip(spec)
        self.path = path
        self.model_name = model_name
        self.device = resolve_device(device)
        create = open_clip.create_model_and_transforms
        # The checkpoint holds every weight, so no tower may first be initialised from a
        # hub download; older open_clip releases lack some of these switches.
        offline = {k: False for k in ("pretrained_image", "pretrained_text") if k in inspect.signature(create).parameters}
        try:
            model, _, _ = create(model_name, pretrained=pretrained, device=self.device, **offline)
        except Exception as exc:
            raise EncoderError(f"{spec}: open_clip could not build the model from {path} ({type(exc).__name__}: {exc})") from exc
        self.model = model.eval()
        self.transform = _transform_from(model)
        self.input_size = self.transform.crop
        self.name = "openclip-" + safe_name(label)
        self.revision = files_revision(files, extra={"model_name": arch or "local-dir"})
        probe = self.transform(np.zeros((1, self.input_size, self.input_size, 3), np.uint8))
        self.feature_dim = int(self._forward(probe).shape[1])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "source": source_path(self.path),
            "kind": "openclip",
            "model_name": self.model_name if not self.model_name.startswith("local-dir:") else "local-dir",
            "transform": self.transform.as_dict(),
        }


def _transform_from(model: Any) -> ResizeNormalize:
    """Rebuild open_clip's eval preprocessing (resize, centre crop, normalise) in torch."""
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    edge = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or getattr(visual, "image_std", None) or IMAGENET_STD)
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    # For square tiles every open_clip resize mode (shortest, longest, squash) is a plain resize.
    return ResizeNormalize(resize=edge, crop=edge, mean=mean, std=std, interpolation=interpolation)
