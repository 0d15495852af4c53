"""Reads of a tiled-TIFF slide through tifffile where they match OpenSlide's.

OpenSlide composites every region it returns (premultiplied ARGB, then a conversion to
RGBA): a 256 px JPEG tile read through it costs three to four times what tifffile spends
decoding the same tile, and preprocessing reads many regions (tissue detection the overview
band by band and membranes block by block, the workers every patch).
tifffile decodes the same tiles with the same libjpeg-turbo and hands them over as RGB,
with a cache of decoded tiles (:class:`~slidevl.slide.reader.TiffSlide`). Tissue detection
and the tile workers of ``preprocess`` read through it.

Exactness is checked, not assumed: a level is read through tifffile only when both readers
see the same pyramid, its downsample is a whole number, and the level's most detailed tile
(its largest in the file) decodes to the same pixels in both; and a region only when it
starts on a whole pixel of the level (tissue detection's reads all do), as OpenSlide
samples between pixels its own way. Everything else is read by the slide's own backend.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
from PIL import Image

from slidevl.slide.reader import Slide, TiffSlide, _quiet_tifffile


class TiffFirst(Slide):
    """``slide`` (opened by OpenSlide), each level read through tifffile where that reads it identically.

    A context manager; closes the tifffile handle it opened, and ``slide`` too if ``owns_slide``.
    """

    def __init__(self, slide: Slide, *, owns_slide: bool = False) -> None:
        super().__init__(slide.path)
        self.backend = slide.backend
        self._slide = slide
        # Asked on every read: OpenSlide builds these anew each time.
        self._dims, self._ds = slide.level_dimensions, slide.level_downsamples
        self._owns_slide = owns_slide
        self._tiff = self._open_tiff(slide)
        self._verdicts: dict[int, bool] = {}  # level -> read through tifffile
        self._lock = threading.Lock()

    @staticmethod
    def _open_tiff(slide: Slide) -> TiffSlide | None:
        if slide.backend != "openslide" or not slide.path.is_file():
            return None
        try:
            with _quiet_tifffile():
                tiff = TiffSlide(slide.path)
        except Exception:  # not a TIFF, or not one tifffile reads: OpenSlide alone reads it
            return None
        if tiff.level_dimensions != tuple(slide.level_dimensions):
            tiff.close()
            return None
        return tiff

    @property
    def tiff_levels(self) -> tuple[int, ...]:
        """Levels read through tifffile so far (for provenance and tests)."""
        return tuple(sorted(level for level, fast in self._verdicts.items() if fast))

    def _source(self, x: int, y: int, level: int) -> Slide:
        ds = self._ds[level]
        if self._tiff is None or x % ds or y % ds:  # between level pixels: where OpenSlide samples is its own
            return self._slide
        with self._lock:  # membrane blocks are read on threads: check each level once
            if level not in self._verdicts:
                self._verdicts[level] = self._matches(level)
            return self._tiff if self._verdicts[level] else self._slide

    def _matches(self, level: int) -> bool:
        tiff = self._tiff
        assert tiff is not None
        ds = self._ds[level]
        box = tiff.largest_tile(level)
        if box is None or ds != round(ds) or tiff.level_downsamples[level] != ds:
            return False
        x, y, w, h = box
        location = (int(x * ds), int(y * ds))
        try:
            return bool(np.array_equal(tiff.read_region(location, level, (w, h)),
                                       self._slide.read_region(location, level, (w, h))))
        except Exception:  # a codec tifffile lacks, or a damaged tile: reads stay with OpenSlide, which says where
            return False

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._ds

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    @property
    def vendor(self) -> str:
        return self._slide.vendor

    def native_mpp(self) -> tuple[float, float, str] | None:
        return self._slide.native_mpp()

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return self._source(int(location[0]), int(location[1]), level).read_region(location, level, size)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        return self._source(x, y, level)._read(x, y, level, width, height)

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        if self._owns_slide:
            self._slide.close()
