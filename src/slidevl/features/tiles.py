"""Tile reading in DataLoader workers, overlapped with encoding in the main process.

The dataset yields whole batches (``batch_size=None`` in the loader): each item reads a
batch of level-0 boxes at one output size from one pyramid level and runs the encoder's
weight-free ``worker_transform`` on it, all inside a worker process. Each worker opens
its own slide handle the first time it needs one; the main process never hands a
handle over, so nothing about a handle has to survive fork or pickling.

Read errors come back as data (``item["error"]``) rather than as a re-raised exception
wrapped in a worker traceback, so the per-slide message stays short and clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset

from slidevl.slide.reader import Slide, open_slide


@dataclass(frozen=True)
class BoxBatch:
    """One unit of work: boxes of one kind, read at ``out_size`` from ``level``."""

    kind: str  # "patch" or "pack"
    start: int  # row of the first box in the kind's output array
    boxes: np.ndarray  # (B, 4) level-0 x0, y0, x1, y1
    out_size: int
    level: int


def make_batches(kind: str, boxes: np.ndarray, out_size: int, level: int, batch_size: int) -> list[BoxBatch]:
    """Split ``boxes`` into consecutive batches."""
    return [
        BoxBatch(kind, s, np.ascontiguousarray(boxes[s : s + batch_size]), out_size, level)
        for s in range(0, len(boxes), batch_size)
    ]


class BoxBatchDataset(Dataset):
    """Reads and transforms one :class:`BoxBatch` per item, with a lazily opened slide."""

    def __init__(self, slide_path: Path, batches: list[BoxBatch], transform: Callable[[np.ndarray], Any]) -> None:
        self.slide_path = Path(slide_path)
        self.batches = batches
        self.transform = transform
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def _handle(self) -> Slide:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        return self._slide

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.batches[i]
        item: dict[str, Any] = {"kind": batch.kind, "start": batch.start, "n": len(batch.boxes), "x": None, "error": None}
        try:
            slide = self._handle()
            tiles = np.stack([slide.read_box(box, batch.out_size, batch.level) for box in batch.boxes])
            item["x"] = self.transform(tiles)
        except Exception as exc:  # reported per slide by the main process
            item["error"] = f"{type(exc).__name__}: {exc}"
        return item

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    # Keep worker_transform's output type untouched (the default would turn arrays into tensors).
    return item


def iterate_batches(dataset: BoxBatchDataset, workers: int, prefetch: int = 4) -> Iterator[dict[str, Any]]:
    """Items of ``dataset`` in order, read by ``workers`` processes (0 = in this process)."""
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
    )
    try:
        yield from loader
    finally:
        dataset.close()

