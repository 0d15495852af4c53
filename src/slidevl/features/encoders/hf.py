"""``hf:/local/dir``: any Hugging Face ``transformers`` vision backbone as a tile encoder.

The folder is what ``save_pretrained`` writes (``config.json`` plus weights), optionally
with the image processor's ``preprocessor_config.json``. Nothing is downloaded:
every load passes ``local_files_only=True``.

Preprocessing mirrors the image processor (resize, centre crop, rescale, normalise) in
torch, so it runs in the DataLoader workers. Without a processor the model config's
``image_size`` and the ImageNet mean/std are used.

Pooling, decided once at load and recorded in the provenance: the model's
``pooler_output`` when its pooler weights were in the checkpoint (a pooler that
``from_pretrained`` had to initialise randomly would turn features into noise), else
the CLS token for models that have one, else the mean over tokens, or global average
pooling of a convolutional feature map.

``transformers`` is imported only when a model is loaded, so worker processes that
unpickle this encoder to run :meth:`HFEncoder.worker_transform` do not pay for it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidevl.features.encoders.base import (
    EncoderError,
    NetworkTileEncoder,
    files_revision,
    model_dir_name,
    resolve_device,
    safe_name,
    source_path,
)
from slidevl.features.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD, PIL_RESAMPLE, ResizeNormalize
from slidevl.features.encoders.weights import WEIGHT_SUFFIXES

VALID_HF_DIR = (
    "a local folder written by `save_pretrained`, holding config.json and the weights "
    "(model.safetensors or pytorch_model.bin), e.g. hf:/models/dinov2-small"
)


def check_model_dir(path: Path, spec: str, valid: str = VALID_HF_DIR) -> Path:
    """Fail clearly unless ``path`` is a folder with ``config.json`` and weight files."""
    path = path.expanduser()
    if not path.exists():
        raise EncoderError(f"{spec}: {path} does not exist; expected {valid}. Nothing is downloaded.")
    if not path.is_dir():
        raise EncoderError(f"{spec}: {path} is a file, not a folder; expected {valid}")
    if not (path / "config.json").is_file():
        raise EncoderError(f"{spec}: {path} has no config.json; expected {valid}")
    if not weight_files(path):
        raise EncoderError(f"{spec}: {path} holds no weights (*.safetensors / *.bin); expected {valid}")
    return path


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def load_pretrained(path: Path, spec: str, **kwargs: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``AutoModel.from_pretrained`` from a local folder only, with errors that name the folder."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise EncoderError(
            f"{spec}: could not load a transformers model from {path} ({type(exc).__name__}: {exc}); "
            "re-save it with `model.save_pretrained(dir)` under this transformers version"
        ) from exc
    return model, info


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def processor_transform(processor: Any, config: Any) -> ResizeNormalize:
    """The :class:`ResizeNormalize` equivalent of a Hugging Face image processor.

    Handles ``size`` as height/width or shortest edge, ``do_center_crop``/``crop_size``,
    and ConvNeXt's ``crop_pct`` (resize to ``shortest_edge / crop_pct``, then crop),
    which together cover ViT, DeiT, DINOv2/BiT, ResNet, ConvNeXt and Swin processors.
    """
    fallback = int(getattr(config, "image_size", 224) or 224)
    if processor is None:
        return ResizeNormalize(resize=fallback, crop=fallback)
    size = getattr(processor, "size", None) or {}
    edge = _size_value(size, "height") or _size_value(size, "shortest_edge") or fallback
    if _size_value(size, "width") not in (None, edge):
        raise EncoderError(f"image processor resizes to a non-square {size}; tiles are square, re-save it with a square size")
    resize = crop = edge
    crop_pct = getattr(processor, "crop_pct", None)
    if type(processor).__name__.startswith("ConvNext") and crop_pct and _size_value(size, "shortest_edge") and edge < 384:
        resize = int(edge / crop_pct)
    if getattr(processor, "do_center_crop", False):
        crop_size = getattr(processor, "crop_size", None) or {}
        crop = _size_value(crop_size, "height") or crop
    if not getattr(processor, "do_resize", True):
        resize = max(crop, fallback)
    do_norm = getattr(processor, "do_normalize", True)
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
    rescale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    resample = getattr(processor, "resample", 3)
    interpolation = PIL_RESAMPLE.get(int(getattr(resample, "value", resample) or 3), "bicubic")
    return ResizeNormalize(
        resize=resize,
        crop=crop,
        mean=mean if do_norm else None,
        std=std if do_norm else None,
        rescale=rescale,
        interpolation=interpolation,
    )


def _load_processor(path: Path, spec: str) -> Any:
    if not (path / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise EncoderError(
            f"{spec}: {path / 'preprocessor_config.json'} could not be loaded ({type(exc).__name__}: {exc}); "
            "fix or delete it (without it ImageNet mean/std and the config's image_size are used)"
        ) from exc


class HFEncoder(NetworkTileEncoder):
    """A ``transformers`` vision model from a local folder (see module docstring)."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu") -> None:
        spec = f"hf:{model_dir}"
        path = check_model_dir(Path(model_dir), spec)
        self.path = path
        self.device = resolve_device(device)
        model, info = load_pretrained(path, spec)
        if "pixel_values" not in inspect.signature(model.forward).parameters:
            raise EncoderError(
                f"{spec}: {type(model).__name__} does not take pixel_values; an hf: encoder must be a vision "
                "backbone (ViT, DINOv2, ResNet, ConvNeXt, Swin, ...)"
            )
        missing = sorted(info.get("missing_keys") or ())
        unexplained = [k for k in missing if not k.startswith("pooler.")]
        if unexplained:
            raise EncoderError(
                f"{spec}: the checkpoint in {path} lacks {len(unexplained)} weights of {type(model).__name__} "
                f"(e.g. {unexplained[:3]}); its features would be random. Check that config.json matches the weights"
            )
        self._pooler_trained = not missing
        self.model = model.eval().to(self.device)
        self.transform = processor_transform(_load_processor(path, spec), getattr(model, "config", None))
        self.input_size = self.transform.crop
        self.name = "hf-" + safe_name(model_dir_name(path))
        files = [path / "config.json", *weight_files(path)]
        if (path / "preprocessor_config.json").is_file():
            files.append(path / "preprocessor_config.json")
        self.revision = files_revision(files)
        probe = self.transform(np.zeros((1, self.input_size, self.input_size, 3), np.uint8))
        with torch.inference_mode():
            self.pooling = self._pooling_mode(self.model(pixel_values=probe.to(self.device)))
        self.feature_dim = int(self._forward(probe).shape[1])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.model(pixel_values=x))

    def _pooling_mode(self, out: Any) -> str:
        hidden = getattr(out, "last_hidden_state", None)
        if getattr(out, "pooler_output", None) is not None and self._pooler_trained:
            return "pooler_output"
        if hidden is None:
            raise EncoderError(f"{self.path}: the model returned neither pooler_output nor last_hidden_state")
        if hidden.ndim == 4:
            return "global_average"
        if getattr(getattr(self.model, "embeddings", None), "cls_token", None) is not None:
            return "cls_token"
        return "mean_tokens"

    def _pool(self, out: Any) -> torch.Tensor:
        if self.pooling == "pooler_output":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if self.pooling == "global_average":
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls_token":
            return hidden[:, 0]
        return hidden.mean(dim=1)

    def provenance(self) -> dict[str, Any]:
        config = json.loads((self.path / "config.json").read_text())
        return {
            "name": self.name,
            "revision": self.revision,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "source": source_path(self.path),
            "kind": "hf",
            "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "pooling": self.pooling,
            "transform": self.transform.as_dict(),
        }
