"""Tile reading in DataLoader workers, overlapped with encoding in the main process.

The dataset yields whole work items (``batch_size=None`` in the loader). An item reads
level-0 boxes from one pyramid level and runs the encoder's weight-free
``worker_transform`` on them, all inside a worker process. Each worker opens its own
slide handle the first time it needs one; the main process never hands a handle
over, so nothing about a handle has to survive fork or pickling.

Three kinds of item:

* ``patch``: a batch of patch boxes read at the patch size;
* ``pack``: a batch of pack boxes read at the encoder's input size from the pack level;
* ``mosaic``: a group of packs read as their patch cells. When the pack image would be
  read from the same pyramid level as the patches, the pack image *is* the mosaic of
  its cells' patch tiles shrunk to the input size, so each cell is read once and
  serves both the kept patch's feature and the pack image. This saves reading every
  pack's pixels a second time, which otherwise costs more than the patches themselves.

Read errors come back as data (``item["error"]``) rather than as a re-raised exception
wrapped in a worker traceback, so the per-slide message stays short and clear.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from slidevl.slide.reader import Slide, SlideReadError, open_slide, resize_image
from slidevl.slide.tiffreads import TiffFirst


@dataclass(frozen=True)
class WorkItem:
    """One unit of work (see the module docstring for the kinds)."""

    kind: str  # "patch" | "pack" | "mosaic"
    boxes: np.ndarray  # patch/pack: (B, 4); mosaic: (M, k*k, 4) cell boxes of each pack
    rows: np.ndarray  # patch/pack: (B,) rows into the output; mosaic: (M,) pack rows
    level: int
    out_size: int  # patch/pack: tile size read; mosaic: the pack image size
    cell_rows: np.ndarray | None = None  # mosaic: (M, k*k) patch row of each cell, -1 if not kept
    cell_px: int = 0  # mosaic: patch tile size


def patch_items(boxes: np.ndarray, rows: np.ndarray, out_size: int, level: int, batch_size: int) -> list[WorkItem]:
    """Consecutive batches of patch boxes."""
    return [
        WorkItem("patch", np.ascontiguousarray(boxes[s : s + batch_size]), rows[s : s + batch_size], level, out_size)
        for s in range(0, len(boxes), batch_size)
    ]


def pack_items(boxes: np.ndarray, out_size: int, level: int, batch_size: int) -> list[WorkItem]:
    """Consecutive batches of pack boxes, each read directly at ``out_size``."""
    rows = np.arange(len(boxes))
    return [
        WorkItem("pack", np.ascontiguousarray(boxes[s : s + batch_size]), rows[s : s + batch_size], level, out_size)
        for s in range(0, len(boxes), batch_size)
    ]


def mosaic_items(cell_boxes: np.ndarray, cell_rows: np.ndarray, cell_px: int, out_size: int, level: int,
                 batch_size: int) -> list[WorkItem]:
    """Groups of packs, about ``batch_size`` cells each (at least one pack per item)."""
    per_item = max(1, batch_size // cell_boxes.shape[1])
    rows = np.arange(len(cell_boxes))
    return [
        WorkItem("mosaic", np.ascontiguousarray(cell_boxes[s : s + per_item]), rows[s : s + per_item], level, out_size,
                 cell_rows=cell_rows[s : s + per_item], cell_px=cell_px)
        for s in range(0, len(cell_boxes), per_item)
    ]


def mosaic(tiles: np.ndarray, size: int) -> np.ndarray:
    """Stitch ``(k*k, t, t, 3)`` row-major cell tiles into one image shrunk to ``size`` px."""
    cells, t = tiles.shape[0], tiles.shape[1]
    k = int(round(cells**0.5))
    big = tiles.reshape(k, k, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(k * t, k * t, 3)
    return np.asarray(resize_image(Image.fromarray(big), (size, size)))


class WorkItemDataset(Dataset):
    """Reads and transforms one :class:`WorkItem` per index, with a lazily opened slide."""

    def __init__(self, slide_path: Path, items: list[WorkItem], transform: Callable[[np.ndarray], Any]) -> None:
        self.slide_path = Path(slide_path)
        self.items = items
        self.transform = transform
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _handle(self) -> Slide:
        if self._slide is None:
            # Tiled TIFF levels through tifffile where it decodes them as OpenSlide does: a third of the CPU.
            self._slide = TiffFirst(open_slide(self.slide_path), owns_slide=True)
        return self._slide

    def _read(self, boxes: np.ndarray, size: int, level: int) -> np.ndarray:
        slide = self._handle()
        return np.stack([slide.read_box(box, size, level) for box in boxes])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        # "patch"/"pack": (rows into the output arrays, transformed batch); n_patches drives progress.
        out: dict[str, Any] = {"patch": None, "pack": None, "n_patches": 0, "error": None}
        try:
            if item.kind in ("patch", "pack"):
                out[item.kind] = (item.rows, self.transform(self._read(item.boxes, item.out_size, item.level)))
                out["n_patches"] = len(item.rows) if item.kind == "patch" else 0
            else:
                m, cells = item.cell_rows.shape
                px = item.cell_px
                tiles = self._read(item.boxes.reshape(-1, 4), px, item.level).reshape(m, cells, px, px, 3)
                kept = item.cell_rows >= 0
                if kept.any():
                    out["patch"] = (item.cell_rows[kept], self.transform(tiles[kept]))
                images = np.stack([mosaic(t, item.out_size) for t in tiles])
                out["pack"] = (item.rows, self.transform(images))
                out["n_patches"] = int(kept.sum())
        except SlideReadError as exc:  # already names the file and the place
            out["error"] = str(exc)
        except Exception as exc:  # reported per slide by the main process
            out["error"] = f"{self.slide_path}: reading {item.kind} tiles failed ({type(exc).__name__}: {exc})"
        return out

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def ignore_interrupts(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C and SIGTERM to the main process.

    A terminal sends Ctrl-C to the whole process group; a worker that died of it would
    print its own traceback and make the loader raise "worker killed" over the main
    process's clean interrupt. Ignoring both, the main process shuts the workers down
    when its iterator is closed (:func:`stop_workers`; PyTorch's watchdog ends them if the
    main one is killed).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    # Keep worker_transform's output type untouched (the default would turn arrays into tensors).
    return item


# Items read ahead across all workers. Each is a transformed batch (64 tiles at 224 px
# in float32 is 38 MB) held in shared memory, and copied to pinned memory too when
# encoding on CUDA, so the total is bounded instead of growing with the worker count.
# A few queued batches are all the overlap needs: the encoder takes the next one while
# the workers refill the queue.
ITEMS_IN_FLIGHT = 8


def prefetch_factor(workers: int) -> int:
    """Items each worker reads ahead: about :data:`ITEMS_IN_FLIGHT` in all, at least 2 each."""
    return max(2, -(-ITEMS_IN_FLIGHT // max(workers, 1)))


def iterate_items(dataset: WorkItemDataset, workers: int, *, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Results of ``dataset`` in order, read by ``workers`` processes (0 = in this process).

    Workers read ahead while the caller encodes, so reading overlaps encoding.
    ``pin_memory`` (for CUDA) makes the loader copy each batch into page-locked memory
    in a background thread, from which the encoder's host-to-device copy is
    asynchronous.
    """
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor(workers) if workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=ignore_interrupts if workers > 0 else None,
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:
        stop_workers(batches)
        dataset.close()


def stop_workers(batches: Iterator[Any]) -> None:
    """End a DataLoader iterator's workers now, and for certain.

    PyTorch's own shutdown (run when the iterator is collected) waits a few seconds for each
    worker, then asks a straggler (a worker still inside a slow read) to go with SIGTERM,
    which :func:`ignore_interrupts` makes it ignore; the interpreter's exit then waits for
    that read however long it takes (a stalled network mount: forever). So run the shutdown
    here, then kill whatever is left: workers only read, and nothing they hold is worth
    waiting for.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent with workers=0
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()
