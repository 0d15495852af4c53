"""Resize, centre-crop and normalise uint8 tile batches into model input tensors.

Model adapters need the same preprocessing as their image processor, but in the
DataLoader workers, on whole batches, and without torchvision (it does not import
beside every torch build). Resizing runs ``torch.nn.functional.interpolate`` with
antialiasing on the uint8 tiles in channels-last layout: torch's dedicated kernel for
that case reproduces PIL's resampling (which the Hugging Face processors use) to within
one or two intensity levels, and is about 25x faster than resizing in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slidevl.features.encoders.base import EncoderError, check_tiles

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# PIL resampling codes as stored in Hugging Face processor configs.
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ResizeNormalize:
    """Picklable batch transform: uint8 ``(B, H, W, 3)`` to float32 ``(B, 3, crop, crop)``.

    The tile is resized to ``resize`` x ``resize`` (skipped when it already has that
    size), centre-cropped to ``crop``, scaled by ``rescale`` and normalised by
    ``mean``/``std`` per channel (skipped when ``mean`` is None).
    """

    resize: int
    crop: int
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    rescale: float = 1 / 255
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.crop > self.resize or self.crop < 1:
            raise EncoderError(f"crop size {self.crop} must be between 1 and the resize size {self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise EncoderError(f"interpolation {self.interpolation!r} not one of {INTERPOLATIONS}")

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        tiles = check_tiles(tiles)
        # (B, H, W, 3) memory seen as (B, 3, H, W) is exactly torch's channels-last layout.
        tiles = np.ascontiguousarray(tiles)
        if not tiles.flags.writeable:  # torch warns on read-only memory, e.g. tiles read from a shared buffer
            tiles = tiles.copy()
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        if x.shape[-1] != self.resize:
            kwargs = {} if self.interpolation == "nearest" else {"antialias": True, "align_corners": False}
            x = torch.nn.functional.interpolate(x, size=(self.resize, self.resize), mode=self.interpolation, **kwargs)
        if self.crop != self.resize:
            top = (self.resize - self.crop) // 2
            x = x[:, :, top : top + self.crop, top : top + self.crop]
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if self.mean is None or self.std is None:
            return x.mul_(self.rescale)
        # (x * rescale - mean) / std, as one subtraction and one scaling in place.
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub_(mean / self.rescale).mul_(self.rescale / std)

    def as_dict(self) -> dict[str, object]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "rescale": self.rescale,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class AuthorTransform:
    """A preset's preprocessing exactly as its authors' code runs it: torchvision on PIL images.

    ``Resize(resize)`` (shorter side, PIL resampling), ``CenterCrop(crop)``, ``ToTensor``,
    ``Normalize(mean, std)``, one tile at a time, stacked into a ``(B, 3, crop, crop)``
    batch. Slower than :class:`ResizeNormalize` by a few hundred microseconds a tile, but
    bit-identical to the model cards' pipelines, so features equal the authors' features.
    torchvision is imported in the worker that runs it, not when this module loads.
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop > self.resize or self.crop < 1:
            raise EncoderError(f"crop size {self.crop} must be between 1 and the resize size {self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise EncoderError(f"interpolation {self.interpolation!r} not one of {INTERPOLATIONS}")

    def pipeline(self):  # -> torchvision.transforms.Compose
        from torchvision import transforms

        mode = transforms.InterpolationMode(self.interpolation)
        return transforms.Compose(
            [
                transforms.Resize(self.resize, interpolation=mode),
                transforms.CenterCrop(self.crop),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        from PIL import Image

        tiles = check_tiles(tiles)
        pipeline = self.pipeline()
        if len(tiles) == 0:
            return torch.zeros((0, 3, self.crop, self.crop), dtype=torch.float32)
        return torch.stack([pipeline(Image.fromarray(tile)) for tile in tiles])

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": "torchvision on PIL",
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
