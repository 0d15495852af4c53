"""The tile-encoder contract shared by the preprocessing pipeline and every encoder.

The pipeline reads 256 px tiles at the target mpp inside DataLoader worker processes
and calls :meth:`TileEncoder.worker_transform` there, on a whole uint8 batch. The
result crosses the process boundary and is handed to :meth:`TileEncoder.encode` in the
main process, which owns the model (and the accelerator, if any).

So ``worker_transform`` does all the CPU work that needs no weights (resizing,
normalising, hand-made features), and an encoder pickles without its model:
:meth:`TileEncoder.__getstate__` drops every attribute named in ``_unpicklable``. A
copy made that way (what a ``spawn`` worker receives) can transform but not encode.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from slidevl.errors import InputError


class EncoderError(InputError):
    """An encoder spec, a model directory or an input batch is invalid."""


class TileEncoder(abc.ABC):
    """A patch encoder: uint8 RGB tiles in, one float32 feature row per tile out."""

    name: str
    revision: str
    input_size: int
    feature_dim: int
    # Attributes holding weights or devices; they are not sent to worker processes.
    _unpicklable: tuple[str, ...] = ()

    @abc.abstractmethod
    def worker_transform(self, tiles: np.ndarray) -> np.ndarray | torch.Tensor:
        """Weight-free CPU work on a ``(B, H, W, 3)`` uint8 batch; runs in DataLoader workers."""

    @abc.abstractmethod
    def encode(self, transformed: Any) -> np.ndarray:
        """Features ``(B, feature_dim)`` float32 of a batch returned by :meth:`worker_transform`."""

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """JSON-able description: name, revision, input size, feature dim, source, ..."""

    def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Encode a uint8 batch in one call (transform and model in this process)."""
        return self.encode(self.worker_transform(tiles))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in self._unpicklable:
            state[key] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, revision={self.revision!r}, feature_dim={self.feature_dim})"


class NetworkTileEncoder(TileEncoder):
    """A tile encoder whose weights live in the main process: workers only resize and normalise.

    Subclasses set ``model``, ``device``, ``transform`` (tiles -> ``(B, 3, S, S)`` tensor)
    and ``feature_dim``, and implement :meth:`_embed`.

    ``precision`` picks the arithmetic of the forward pass (see :data:`PRECISIONS`);
    the default ``"auto"`` is bf16 autocast on CUDA and plain float32 elsewhere.
    Features always come back as float32.
    """

    _unpicklable = ("model",)
    model: Any
    device: torch.device
    transform: Any
    # A class default, so subclasses need not set it; :meth:`set_precision` changes it.
    precision: str = "auto"

    @abc.abstractmethod
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` features of a normalised batch already on ``self.device``."""

    def set_precision(self, precision: str) -> None:
        """Choose ``"auto"``, ``"fp32"`` or ``"bf16"`` for later :meth:`encode` calls."""
        resolve_precision(precision, self.device)  # validates before anything changes
        self.precision = precision

    @property
    def compute_precision(self) -> str:
        return resolve_precision(self.precision, self.device)

    def worker_transform(self, tiles: np.ndarray) -> torch.Tensor:
        return self.transform(tiles)

    def encode(self, transformed: Any) -> np.ndarray:
        if self.model is None:
            raise EncoderError(f"{self.name}: this is a worker copy without the model; call encode() in the main process")
        x = torch.as_tensor(transformed)
        if x.ndim != 4 or x.shape[1] != 3:
            raise EncoderError(f"{self.name}: encode() expects the (B, 3, S, S) tensor from worker_transform(), got {tuple(x.shape)}")
        return check_features(self._forward(x), self.feature_dim, self.name)

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        # From pinned memory (the DataLoader pins batches when encoding on CUDA) the copy
        # is asynchronous; elsewhere non_blocking is a no-op. The input stays float32:
        # autocast, not a cast of the batch, decides which ops run in bf16.
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        bf16 = self.compute_precision == "bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = self._embed(x)
        return feats.float().cpu().numpy()


def check_tiles(tiles: np.ndarray) -> np.ndarray:
    """Validate a tile batch: uint8, shape ``(B, H, W, 3)`` with ``H == W``."""
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8:
        raise EncoderError(f"tiles must be uint8 RGB, got dtype {tiles.dtype}; read tiles as uint8 (0-255)")
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.shape[1] != tiles.shape[2]:
        raise EncoderError(
            f"tiles must have shape (B, H, W, 3) with H == W, got {tiles.shape}; drop the alpha channel "
            "and read square patches"
        )
    return tiles


def check_features(features: Any, dim: int, encoder: str) -> np.ndarray:
    """Return ``features`` as a float32 ``(B, dim)`` array or raise naming ``encoder``."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != dim:
        raise EncoderError(
            f"{encoder}: expected features of shape (B, {dim}), got {features.shape}; pass encode() the output "
            "of this encoder's worker_transform()"
        )
    return features


def safe_name(text: str) -> str:
    """A filesystem-safe folder name: letters, digits, ``.``, ``_`` and ``-`` only."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text).strip(".-")
    return cleaned or "model"


def model_dir_name(path: Path) -> str:
    """A readable name for a model folder, seeing through Hugging Face cache snapshots.

    A cache snapshot lives at ``models--org--name/snapshots/<commit>/``; its last
    component is a commit hash, so the repository folder names the model instead.
    """
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):]
    return path.name


def files_revision(files: Iterable[Path], extra: Any = None) -> str:
    """Short hash of file names, sizes and (small) config content: the weights' identity.

    Hashing every weight byte would cost seconds per gigabyte on each start; names and
    sizes plus the full config text tell revisions apart in practice.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


# Forward-pass arithmetic. "auto" is bf16 autocast on CUDA, where tensor cores run it
# several times faster than fp32, and plain float32 elsewhere: CPU features stay
# bit-identical to what they always were. The resolved value enters the job
# fingerprint, so a job never takes one precision's features as complete for another.
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision ``"fp32"`` or ``"bf16"`` that ``precision`` means on ``device``."""
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_device(device: str) -> torch.device:
    """Parse a device string and fail clearly when the device is absent."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EncoderError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EncoderError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    return dev


def source_path(path: str | os.PathLike[str]) -> str:
    """Absolute path string recorded in provenance."""
    return str(Path(path).resolve())
