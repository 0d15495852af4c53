"""Where pretraining slides come from: a feature store, or batches held in memory."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from slidevl.slidellm.encoder.batch import TopoPackBatch, batch_from_slide_features
from slidevl.slidellm.encoder.config import TopoPackConfig


class SlideSource(Protocol):
    """Anything that lists slide ids and loads one slide as a single-slide batch."""

    def slide_ids(self) -> list[str]: ...

    def load(self, slide_id: str) -> TopoPackBatch: ...


class FeatureStoreSource:
    """Slides of a feature-store job (``<job>/features/<encoder>/*.h5``)."""

    def __init__(self, job_dir: str | Path, encoder: str | None = None) -> None:
        from slidevl.features.store import FeatureStore  # h5py only when a store is used

        self.store = FeatureStore(job_dir, encoder)

    def slide_ids(self) -> list[str]:
        return self.store.slide_ids()

    def load(self, slide_id: str) -> TopoPackBatch:
        # Region features are not used by the slide encoder; skip reading them.
        return batch_from_slide_features(self.store.load(slide_id, load=("patch", "pack", "global")))


class MemorySource:
    """Single-slide batches held in memory (tests, synthetic cohorts, small studies)."""

    def __init__(self, batches: Mapping[str, TopoPackBatch] | Iterable[TopoPackBatch]) -> None:
        if isinstance(batches, Mapping):
            items = dict(batches)
        else:
            items = {}
            for b in batches:
                if b.batch_size != 1:
                    raise ValueError("MemorySource holds single-slide batches")
                items[b.slide_ids[0]] = b
        if not items:
            raise ValueError("MemorySource needs at least one slide")
        self._batches = items

    def slide_ids(self) -> list[str]:
        return sorted(self._batches)

    def load(self, slide_id: str) -> TopoPackBatch:
        try:
            return self._batches[slide_id]
        except KeyError:
            raise KeyError(f"slide {slide_id!r} is not in this source") from None


class CachedSource:
    """An LRU cache of the last ``size`` slides loaded from another source."""

    def __init__(self, source: SlideSource, size: int = 8) -> None:
        self.source = source
        self.size = max(0, int(size))
        self._cache: OrderedDict[str, TopoPackBatch] = OrderedDict()

    def slide_ids(self) -> list[str]:
        return self.source.slide_ids()

    def load(self, slide_id: str) -> TopoPackBatch:
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        batch = self.source.load(slide_id)
        if self.size:
            self._cache[slide_id] = batch
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return batch


def feature_dims(batch: TopoPackBatch) -> tuple[int, int, int]:
    """(patch_dim, pack_dim, global_dim) of a batch; 0 where a table is absent."""
    return (
        int(batch.patch_features.shape[-1]),
        int(batch.pack_features.shape[-1]),
        int(batch.global_feature.shape[-1]),
    )


def encoder_config_for(source: SlideSource, **overrides: Any) -> TopoPackConfig:
    """An encoder config sized to ``source``'s feature widths and pack size; ``overrides`` set the rest."""
    ids = source.slide_ids()
    if not ids:
        raise ValueError("the slide source is empty")
    first = source.load(ids[0])
    patch_dim, pack_dim, global_dim = feature_dims(first)
    return TopoPackConfig(patch_dim=patch_dim, pack_dim=pack_dim, global_dim=global_dim, pack_size=first.pack_size, **overrides)
