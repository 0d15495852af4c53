"""Deep-zoom tiles and thumbnails, one :class:`DeepZoomGenerator` per slide, LRU-cached bytes.

Tiles are addressed in the generator's own level numbering (level 0 is 1×1 px, the last
level is level-0 of the slide), which is what OpenSeadragon requests for a DZI source.
``limit_bounds`` stays off so tile pixels and overlay coordinates share the slide's
level-0 frame. OpenSlide handles are safe for concurrent reads, so one handle per slide
serves every worker thread.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slidevl.errors import InputError, SlideError
from slidevl.features.slidepaths import SlideFileError
from slidevl.slide.reader import SlideOpenError, dicom_series_file

FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}


class TileRangeError(InputError):
    """Level, column or row outside the slide's pyramid."""


class SlideUnreadableError(SlideError):
    """The slide file is missing or OpenSlide cannot open it."""


class ByteLRU:
    """Thread-safe LRU of encoded images, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._data[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._size -= len(evicted)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._data), "bytes": self._size, "hits": self.hits, "misses": self.misses}


@dataclass(frozen=True)
class SlideMeta:
    """What the page needs to set up a viewer for one slide."""

    width: int
    height: int
    mpp: float | None
    levels: int
    tile_size: int
    overlap: int
    vendor: str | None
    objective_power: str | None


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    pil_format, _ = FORMATS[fmt]
    buf = io.BytesIO()
    image = image.convert("RGB")
    if pil_format == "JPEG":
        image.save(buf, pil_format, quality=quality)
    else:
        image.save(buf, pil_format)
    return buf.getvalue()


class TileService:
    """Owns the open slides and the tile cache of one server.

    ``resolve`` maps a slide id to its file and may raise
    :class:`~slidevl.features.slidepaths.SlideFileError`, whose message (paths tried, fix)
    becomes the :class:`SlideUnreadableError`.
    """

    def __init__(self, resolve: Callable[[str], Path], *, tile_size: int = 254, overlap: int = 1,
                 quality: int = 80, cache_bytes: int = 256 * 2**20) -> None:
        self._resolve = resolve
        self.tile_size = tile_size
        self.overlap = overlap
        self.quality = quality
        self.cache = ByteLRU(cache_bytes)
        self._slides: dict[str, tuple[openslide.OpenSlide, DeepZoomGenerator]] = {}
        self._lock = threading.Lock()

    def _open(self, slide_id: str) -> tuple[openslide.OpenSlide, DeepZoomGenerator]:
        with self._lock:
            hit = self._slides.get(slide_id)
            if hit is not None:
                return hit
            try:
                path = self._resolve(slide_id)
            except SlideFileError as exc:
                raise SlideUnreadableError(str(exc)) from exc
            try:
                # A DICOM slide is a folder: OpenSlide opens it through one file of its series.
                osr = openslide.OpenSlide(dicom_series_file(path) if path.is_dir() else path)
            except SlideOpenError as exc:
                raise SlideUnreadableError(str(exc)) from exc
            except (openslide.OpenSlideError, OSError) as exc:
                raise SlideUnreadableError(f"{path}: OpenSlide cannot open it ({exc}); replace the file with a readable copy") from exc
            pair = (osr, DeepZoomGenerator(osr, tile_size=self.tile_size, overlap=self.overlap, limit_bounds=False))
            self._slides[slide_id] = pair
            return pair

    def meta(self, slide_id: str) -> SlideMeta:
        osr, dz = self._open(slide_id)
        props = osr.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        return SlideMeta(
            width=osr.dimensions[0], height=osr.dimensions[1],
            mpp=float(mpp) if mpp else None,
            levels=dz.level_count, tile_size=self.tile_size, overlap=self.overlap,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR),
            objective_power=props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER),
        )

    def dzi(self, slide_id: str, fmt: str = "jpeg") -> str:
        _, dz = self._open(slide_id)
        return dz.get_dzi(fmt)

    def cached(self, slide_id: str, level: int, col: int, row: int, fmt: str) -> bytes | None:
        """The tile's bytes if they are in the cache (cheap: safe to call on the event loop)."""
        if fmt not in FORMATS:
            raise TileRangeError(f"format {fmt!r} not served; use one of {sorted(FORMATS)}")
        return self.cache.get(("tile", slide_id, level, col, row, FORMATS[fmt][0]))

    def render(self, slide_id: str, level: int, col: int, row: int, fmt: str) -> bytes:
        """Render and cache a tile; raises :class:`TileRangeError` outside the pyramid."""
        if fmt not in FORMATS:
            raise TileRangeError(f"format {fmt!r} not served; use one of {sorted(FORMATS)}")
        _, dz = self._open(slide_id)
        if not 0 <= level < dz.level_count:
            raise TileRangeError(f"level {level} outside 0..{dz.level_count - 1}")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileRangeError(f"tile ({col}, {row}) outside {cols}×{rows} at level {level}")
        data = _encode(dz.get_tile(level, (col, row)), fmt, self.quality)
        self.cache.put(("tile", slide_id, level, col, row, FORMATS[fmt][0]), data)
        return data

    def tile(self, slide_id: str, level: int, col: int, row: int, fmt: str) -> bytes:
        """Encoded tile bytes, from the cache or freshly rendered."""
        data = self.cached(slide_id, level, col, row, fmt)
        return data if data is not None else self.render(slide_id, level, col, row, fmt)

    def thumbnail(self, slide_id: str, size: int) -> bytes:
        key = ("thumb", slide_id, size)
        data = self.cache.get(key)
        if data is not None:
            return data
        osr, _ = self._open(slide_id)
        data = _encode(osr.get_thumbnail((size, size)), "jpeg", self.quality)
        self.cache.put(key, data)
        return data

    def close(self) -> None:
        with self._lock:
            for osr, _ in self._slides.values():
                osr.close()
            self._slides.clear()
