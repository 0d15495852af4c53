"""Patient bags from the feature store, read once per cross-validation run.

A patient's bag concatenates the patch tokens of all their slides; region indices are
offset so that they point into the concatenated region table. Slides are read from
HDF5 once and kept in memory as float32 tensors while they fit in ``max_cache_bytes``;
slides beyond the budget are re-read on access rather than exhausting memory.

Region tokens come from one of two sources, recorded in the run summary:
``store``  the ``region/features`` table of the feature file (e.g. a HIPT-style region
           encoder or the region image encoded at lower resolution);
``pooled`` the mean of the patch features of each region.
``auto`` picks ``store`` when the first slide has region features, else ``pooled``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch

from slidevl.features.store import FeatureStoreError, SlideFeatures, read_slide_features

REGION_TOKEN_MODES = ("auto", "store", "pooled")


@dataclass
class SlideSpan:
    """Where one slide sits inside a patient bag."""

    slide_id: str
    start: int
    stop: int
    region_start: int
    region_stop: int
    coords: np.ndarray  # (n, 2) level-0 patch coords
    region_coords: np.ndarray | None  # (r, 2) or None when regions are pooled without coords


@dataclass
class PatientBag:
    """All tokens of one patient: patch (N, D), region (R, D') and the patch → region map."""

    patient_id: str
    key: int  # stable integer id (memory-queue bookkeeping)
    patch: torch.Tensor
    region_index: torch.Tensor
    region: torch.Tensor
    spans: list[SlideSpan]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PatientBag":
        return replace(
            self,
            patch=self.patch.to(device, non_blocking=non_blocking),
            region_index=self.region_index.to(device, non_blocking=non_blocking),
            region=self.region.to(device, non_blocking=non_blocking),
        )


@dataclass
class _SlideTensors:
    patch: torch.Tensor
    region_index: torch.Tensor
    region: torch.Tensor
    coords: np.ndarray
    region_coords: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.patch, self.region_index, self.region))


def default_cache_bytes() -> int:
    """A quarter of physical memory: room for the model, the optimiser and other jobs."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _pool_regions(sf: SlideFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean patch feature per region; only regions that hold a patch get a token."""
    used, local = np.unique(sf.patch_region, return_inverse=True)
    sums = np.zeros((len(used), sf.patch_features.shape[1]), dtype=np.float64)
    np.add.at(sums, local, sf.patch_features)
    pooled = (sums / np.bincount(local, minlength=len(used))[:, None]).astype(np.float32)
    coords = sf.region_coords[used] if sf.region_coords is not None else None
    return pooled, local.astype(np.int64), coords


class FeatureSource(Protocol):
    """Where slide features come from: a :class:`~slidevl.features.store.FeatureStore` or :class:`FeatureFiles`."""

    def path(self, slide_id: str) -> Path: ...

    def load(self, slide_id: str, **kwargs: Any) -> SlideFeatures: ...


class FeatureFiles:
    """Feature files named one by one (the slide id is the file stem)."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = {Path(p).stem: Path(p) for p in paths}

    def path(self, slide_id: str) -> Path:
        return self.paths[slide_id]

    def load(self, slide_id: str, **kwargs: Any) -> SlideFeatures:
        return read_slide_features(self.paths[slide_id], **kwargs)


class BagCache:
    """Builds :class:`PatientBag` objects, reading each slide from disk once."""

    def __init__(self, store: FeatureSource, region_tokens: str = "auto", max_cache_bytes: int | None = None) -> None:
        if region_tokens not in REGION_TOKEN_MODES:
            raise ValueError(f"region_tokens must be one of {REGION_TOKEN_MODES}, got {region_tokens!r}")
        self.store = store
        self.region_tokens = region_tokens
        self.max_cache_bytes = default_cache_bytes() if max_cache_bytes is None else max_cache_bytes
        self._cache: dict[str, _SlideTensors] = {}
        self.cached_bytes = 0
        self.reads = 0

    def _read(self, slide_id: str) -> _SlideTensors:
        sf = self.store.load(slide_id, load=("patch", "region"))
        self.reads += 1
        if sf.n_patches == 0:
            raise FeatureStoreError(f"{self.store.path(slide_id)}: the slide has no patches (no tissue found); drop it from the clinical table")
        if self.region_tokens == "auto":
            self.region_tokens = "store" if sf.region_features is not None else "pooled"
        if self.region_tokens == "store":
            if sf.region_features is None:
                raise FeatureStoreError(
                    f"{self.store.path(slide_id)}: no region/features table; extract region features, "
                    "or use --region-tokens pooled to pool patch features per region"
                )
            region, region_index, region_coords = sf.region_features, sf.patch_region, sf.region_coords
        else:
            region, region_index, region_coords = _pool_regions(sf)
        return _SlideTensors(
            patch=torch.from_numpy(np.ascontiguousarray(sf.patch_features, dtype=np.float32)),
            region_index=torch.from_numpy(np.asarray(region_index, dtype=np.int64)),
            region=torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32)),
            coords=np.asarray(sf.patch_coords),
            region_coords=None if region_coords is None else np.asarray(region_coords),
        )

    def slide(self, slide_id: str) -> _SlideTensors:
        hit = self._cache.get(slide_id)
        if hit is not None:
            return hit
        tensors = self._read(slide_id)
        if self.cached_bytes + tensors.nbytes <= self.max_cache_bytes:
            self._cache[slide_id] = tensors
            self.cached_bytes += tensors.nbytes
        return tensors

    def bag(self, patient_id: str, slide_ids: Iterable[str], key: int = -1) -> PatientBag:
        """Concatenate the slides of one patient into one bag."""
        parts, spans = [], []
        n = r = 0
        for slide_id in slide_ids:
            s = self.slide(slide_id)
            spans.append(SlideSpan(slide_id, n, n + len(s.patch), r, r + len(s.region), s.coords, s.region_coords))
            parts.append(s)
            n += len(s.patch)
            r += len(s.region)
        if not parts:
            raise ValueError(f"patient {patient_id} has no slides")
        dims = {p.patch.shape[1] for p in parts}
        if len(dims) > 1:
            raise FeatureStoreError(f"patient {patient_id}: slides have different feature sizes {sorted(dims)}; use one encoder for all slides")
        offsets = np.cumsum([0] + [len(p.region) for p in parts[:-1]])
        return PatientBag(
            patient_id=patient_id,
            key=key,
            patch=torch.cat([p.patch for p in parts]) if len(parts) > 1 else parts[0].patch,
            region_index=torch.cat([p.region_index + int(o) for p, o in zip(parts, offsets)]),
            region=torch.cat([p.region for p in parts]) if len(parts) > 1 else parts[0].region,
            spans=spans,
        )

    def stats(self) -> dict:
        return {
            "region_tokens": self.region_tokens,
            "cached_slides": len(self._cache),
            "cached_bytes": self.cached_bytes,
            "hdf5_reads": self.reads,
        }
