"""Write a rendered slide as a pyramidal, tiled JPEG TIFF that OpenSlide opens.

Two layouts:

* ``aperio``: level 0 carries an Aperio ImageDescription (``Aperio Image Library ...
  |AppMag = 20|MPP = 0.5``), which makes OpenSlide's Aperio driver take the file and
  report ``openslide.mpp-x`` from it.
* ``generic``: no description; OpenSlide's generic-tiff driver opens it and (OpenSlide
  4) derives ``openslide.mpp-x`` from the TIFF resolution tags, which both layouts set
  to 10,000 / mpp pixels per centimetre.

Reduced levels (downsample 4, 16, ...) are separate tiled pages with
``NewSubfileType = 1`` and no tifffile metadata, as OpenSlide expects.

Memory stays bounded: level 0 is streamed to tifffile tile by tile from the renderer,
while the 4x-reduced level is accumulated alongside (in a temporary memory-mapped file
next to the output once it is large) and written after level 0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tifffile
from PIL import Image

from ..atomic import atomic_path
from .classes import MPP, TILE_PX

LEVEL_FACTOR = 4
SMALLEST_LEVEL_PX = 512  # reduced levels are added until the longest side is <= this
_RAM_LIMIT_BYTES = 256 * 1024**2  # a larger reduced level goes to a temporary memmap

RenderFn = Callable[[int, int, int, int], np.ndarray]  # (y0, x0, height, width) -> RGB


def pyramid_dims(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every level: level 0, then 4x reductions until <= 512 px."""
    dims = [(width, height)]
    while max(dims[-1]) > SMALLEST_LEVEL_PX:
        w, h = dims[-1]
        dims.append((max(1, -(-w // LEVEL_FACTOR)), max(1, -(-h // LEVEL_FACTOR))))
    return dims


def aperio_description(width: int, height: int, mpp: float = MPP, quality: int = 90) -> str:
    """Level-0 ImageDescription in the form written by Aperio scanners."""
    mag = 10.0 / mpp
    mag_s = f"{mag:g}"
    return (
        f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] "
        f"({TILE_PX}x{TILE_PX}) JPEG/RGB Q={quality}|AppMag = {mag_s}|MPP = {mpp:g}"
    )


def downsample4(block: np.ndarray) -> np.ndarray:
    """Box-filter an RGB block by 4 (a partial edge box averages what it covers).

    PIL's ``reduce`` is several times faster than a numpy reshape-sum here.
    """
    return np.asarray(Image.fromarray(np.ascontiguousarray(block)).reduce(LEVEL_FACTOR))


def write_slide_tiff(
    path: str | os.PathLike[str],
    render: RenderFn,
    width: int,
    height: int,
    layout: str = "aperio",
    mpp: float = MPP,
    quality: int = 90,
    block_px: int = 2048,
    on_block: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Render and write one slide atomically; return the level dimensions.

    ``render(y0, x0, h, w)`` must return the RGB block at level-0 (x0, y0);
    ``on_block(n_pixels)`` is called after each rendered block (progress).
    """
    if layout not in ("aperio", "generic"):
        raise ValueError(f"layout must be 'aperio' or 'generic', got {layout!r}")
    if block_px % TILE_PX:
        raise ValueError(f"block_px must be a multiple of {TILE_PX}, got {block_px}")
    dims = pyramid_dims(width, height)
    path = Path(path)
    res = 10_000.0 / mpp  # pixels per centimetre
    common = dict(
        photometric="rgb",
        tile=(TILE_PX, TILE_PX),
        compression="jpeg",
        compressionargs={"level": quality},
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    # Classic TIFF offsets are 32-bit; JPEG at Q90 compresses H&E ~10x, so switch to
    # BigTIFF (which OpenSlide also reads) well before the 4 GiB limit can be reached.
    bigtiff = width * height * 3 > 8 * 1024**3

    with atomic_path(path) as tmp, _level_buffer(dims, path.parent) as level1:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            desc = aperio_description(width, height, mpp, quality) if layout == "aperio" else None
            tiles = _level0_tiles(render, width, height, block_px, level1, on_block)
            tif.write(tiles, shape=(height, width, 3), dtype=np.uint8, description=desc, **common)
            prev = level1
            for w, h in dims[1:]:
                assert prev is not None and prev.shape[:2] == (h, w)
                tif.write(prev, subfiletype=1, **common)
                if (w, h) != dims[-1]:
                    prev = _reduce(prev)
    return dims


def _level0_tiles(
    render: RenderFn,
    width: int,
    height: int,
    block_px: int,
    level1: np.ndarray | None,
    on_block: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    for y0 in range(0, height, TILE_PX):
        bh = min(TILE_PX, height - y0)
        for x0 in range(0, width, block_px):
            bw = min(block_px, width - x0)
            block = render(y0, x0, bh, bw)
            if level1 is not None:
                small = downsample4(block)
                level1[y0 // 4 : y0 // 4 + small.shape[0], x0 // 4 : x0 // 4 + small.shape[1]] = small
            for tx in range(0, bw, TILE_PX):
                tile = block[:, tx : tx + TILE_PX]
                if tile.shape[:2] != (TILE_PX, TILE_PX):
                    # Edge tiles are padded; readers crop them to the image size.
                    tile = np.pad(
                        tile, ((0, TILE_PX - tile.shape[0]), (0, TILE_PX - tile.shape[1]), (0, 0)), mode="edge"
                    )
                yield tile
            if on_block is not None:
                on_block(bh * bw)


def _reduce(level: np.ndarray, rows: int = 1024) -> np.ndarray:
    h, w = level.shape[:2]
    out = np.empty((-(-h // 4), -(-w // 4), 3), np.uint8)
    for y0 in range(0, h, rows):  # rows is a multiple of 4, so strips nest exactly
        small = downsample4(np.asarray(level[y0 : y0 + rows]))
        out[y0 // 4 : y0 // 4 + small.shape[0]] = small
    return out


class _level_buffer:
    """Context manager for the level-1 buffer: RAM when small, a temporary memmap else."""

    def __init__(self, dims: list[tuple[int, int]], directory: Path) -> None:
        self.shape = (dims[1][1], dims[1][0], 3) if len(dims) > 1 else None
        self.directory = directory
        self._file: str | None = None

    def __enter__(self) -> np.ndarray | None:
        if self.shape is None:
            return None
        nbytes = int(np.prod(self.shape))
        if nbytes <= _RAM_LIMIT_BYTES:
            return np.zeros(self.shape, np.uint8)
        fd, self._file = tempfile.mkstemp(prefix=".level1.", suffix=".raw", dir=self.directory)
        os.close(fd)
        return np.memmap(self._file, dtype=np.uint8, mode="w+", shape=self.shape)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            Path(self._file).unlink(missing_ok=True)
