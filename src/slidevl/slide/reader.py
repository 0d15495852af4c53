"""Open whole-slide images: OpenSlide for every format it reads, tifffile for plain TIFF.

A DICOM WSI is a folder holding the ``.dcm`` files of one series (see
:mod:`slidevl.slide.formats`); OpenSlide opens it through one of its files, after a check
that every file belongs to that one series.

Both backends expose the same small surface (:class:`Slide`): level-0 size, the pyramid
(level sizes and downsamples), string properties, and ``read_region`` returning an RGB
``uint8`` array with anything outside the slide (or transparent) painted white.

On top of that, :meth:`Slide.read_box` reads a level-0 box at a requested output size
from the best pyramid level (the highest level whose downsample is not larger than the
needed scale) and resizes only when that level's scale does not match, and
:meth:`Slide.read_downsampled` builds a low-resolution overview band by band so its
memory is bounded by the output, never by the slide.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, TypeVar

import numpy as np
from PIL import Image

from slidevl.errors import SlideError
from slidevl.slide.formats import dicom_files, slide_bytes, slide_of

# Relative slack when comparing a pyramid downsample with a needed scale: OpenSlide
# reports downsamples such as 4.000244 for odd level sizes, which must count as 4.
_SCALE_TOL = 1e-3
# Pixels per band when building an overview; bounds peak memory of read_downsampled.
_BAND_PIXELS = 16 * 1024 * 1024

_Pixels = TypeVar("_Pixels", Image.Image, np.ndarray)


class SlideOpenError(SlideError):
    """A file cannot be opened as a slide; the message names the file and the reason."""


class SlideReadError(SlideError):
    """Pixels could not be read from an opened slide (truncated or corrupt data)."""


def _to_rgb(rgba_or_rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 array with transparent pixels composited onto white."""
    arr = np.asarray(rgba_or_rgb)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3]
        rgb = arr[..., :3]
        if alpha.min() == 255:
            return rgb
        a = alpha[..., None].astype(np.uint16)
        # Un-premultiplied RGBA (OpenSlide's convention); blend onto white.
        return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return arr[..., :3]


def _image_to_rgb(image: Image.Image) -> Image.Image:
    """PIL RGB image with transparent pixels composited onto white (all in C)."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        return image.convert("RGB")
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image.convert("RGB"), mask=alpha)
    return white


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize with PIL: exact integer shrink = box average (``reduce``), other
    shrinks = box filter, enlargements = bilinear."""
    w, h = image.size
    out_w, out_h = size
    if (w, h) == (out_w, out_h):
        return image
    if w % out_w == 0 and h % out_h == 0 and w // out_w == h // out_h:
        return image.reduce(w // out_w)
    if w >= out_w and h >= out_h:
        return image.resize(size, Image.Resampling.BOX)
    return image.resize(size, Image.Resampling.BILINEAR)


class Slide(ABC):
    """A pyramidal slide opened read-only."""

    backend: str = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- backend surface -------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""

    @property
    @abstractmethod
    def properties(self) -> Mapping[str, str]:
        """Vendor/TIFF properties as strings."""

    @property
    @abstractmethod
    def vendor(self) -> str:
        """Format name (OpenSlide's vendor, or ``tiff`` for the fallback)."""

    @abstractmethod
    def native_mpp(self) -> tuple[float, float, str] | None:
        """(mpp_x, mpp_y, property name) as recorded in the file, or None."""

    @abstractmethod
    def _read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB image of ``width`` x ``height`` at ``level``; (x, y) in level-0 pixels."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    # -- shared behaviour --------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size`` pixels at ``level``; ``location`` is level-0 x, y."""
        return np.asarray(self.read_region_image(location, level, size))

    def read_region_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """As :meth:`read_region`, as a PIL RGB image (cheaper to resize before converting)."""
        return self._guarded(self._read, location, level, size)

    def _guarded(self, read: Callable[[int, int, int, int, int], _Pixels], location: tuple[int, int], level: int,
                 size: tuple[int, int]) -> _Pixels:
        """``read(x, y, level, width, height)``, its failures named by file and place."""
        width, height = int(size[0]), int(size[1])
        if width < 1 or height < 1:
            raise ValueError(f"region size must be positive, got {size}")
        try:
            return read(int(location[0]), int(location[1]), int(level), width, height)
        except SlideReadError:
            raise
        except Exception as exc:  # backend errors come in many types; name the place
            raise SlideReadError(
                f"{self.path}: reading {width}x{height} px at level {level}, level-0 {tuple(location)} failed "
                f"({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
            ) from exc

    def best_level(self, scale: float) -> int:
        """Highest level whose downsample is <= ``scale`` (level-0 px per output px)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= scale * (1 + _SCALE_TOL):
                best = level
        return best

    def read_box(self, box: tuple[int, int, int, int] | np.ndarray, out_size: int | tuple[int, int],
                 level: int | None = None) -> np.ndarray:
        """Read level-0 box ``x0, y0, x1, y1`` (exclusive) as an ``out_size`` RGB image.

        Reads from ``level`` (default: the best level for the box's scale) and resizes with
        PIL only when the level's pixel size differs from the requested output size.
        """
        x0, y0, x1, y1 = (int(v) for v in box)
        out_w, out_h = (out_size, out_size) if isinstance(out_size, (int, np.integer)) else out_size
        if level is None:
            level = self.best_level(min((x1 - x0) / out_w, (y1 - y0) / out_h))
        ds = self.level_downsamples[level]
        w = max(1, int(round((x1 - x0) / ds)))
        h = max(1, int(round((y1 - y0) / ds)))
        if (w, h) == (out_w, out_h):  # no resize: a backend that decodes to arrays skips PIL
            return self.read_region((x0, y0), level, (w, h))
        return np.asarray(resize_image(self.read_region_image((x0, y0), level, (w, h)), (out_w, out_h)))

    def read_downsampled(self, downsample: float | None = None, *, level: int | None = None,
                         size: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
        """Whole-slide overview and the level it was read from.

        Give ``downsample`` (output is level-0 size / downsample, read from the best level),
        ``level`` (that level as-is, resized to ``size`` if given), or ``size`` alone. The
        level is read in horizontal bands, each resized on its own, so memory stays
        bounded by the output image plus one band.
        """
        w0, h0 = self.dimensions
        if size is None:
            if downsample is None:
                if level is None:
                    raise ValueError("give downsample, level or size")
                size = self.level_dimensions[level]
            else:
                size = (max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample))))
        out_w, out_h = int(size[0]), int(size[1])
        if level is None:
            level = self.best_level(min(w0 / out_w, h0 / out_h))
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        fy = lh / out_h
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        band_rows = max(1, int(_BAND_PIXELS // max(1, lw) / max(fy, 1.0)))
        for r0 in range(0, out_h, band_rows):
            r1 = min(out_h, r0 + band_rows)
            # Source rows covering output rows [r0, r1), widened to whole pixels.
            s0 = int(math.floor(r0 * fy))
            s1 = min(lh, int(math.ceil(r1 * fy)))
            band = self.read_region_image((0, int(round(s0 * ds))), level, (lw, max(1, s1 - s0)))
            if band.size != (out_w, r1 - r0):
                band = band.resize((out_w, r1 - r0), Image.Resampling.BOX, box=(0.0, r0 * fy - s0, float(lw), r1 * fy - s0))
            out[r0:r1] = np.asarray(band)
        return out, level

    def describe(self) -> dict[str, object]:
        """Provenance of the slide: path, backend, vendor, sizes and pyramid."""
        return {
            "path": str(self.path.resolve()),
            "file_bytes": slide_bytes(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
        }


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads (Aperio, DICOM, Hamamatsu, Leica, MIRAX, Philips, generic TIFF…).

    ``source`` is the file OpenSlide opens when it is not ``path`` itself: a DICOM slide's
    path is its folder, opened through one of its files.
    """

    backend = "openslide"

    def __init__(self, path: Path, source: Path | None = None) -> None:
        import openslide

        super().__init__(path)
        self._osr = openslide.OpenSlide(str(source or path))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._osr.properties

    @property
    def vendor(self) -> str:
        return str(self._osr.properties.get("openslide.vendor", "unknown"))

    def native_mpp(self) -> tuple[float, float, str] | None:
        props = self._osr.properties
        if "openslide.mpp-x" not in props:
            return None
        mpp_x = float(props["openslide.mpp-x"])
        mpp_y = float(props.get("openslide.mpp-y", mpp_x))
        return mpp_x, mpp_y, "openslide.mpp-x"

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        return _image_to_rgb(self._osr.read_region((x, y), level, (width, height)))

    def close(self) -> None:
        self._osr.close()


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


#: Decoded tiles a :class:`TiffSlide` keeps (OpenSlide keeps 32 MiB too): about 170 RGB
#: tiles of 256 px, a few rows of tiles of a level, so that reading a region row by row
#: decodes each tile once.
_TILE_CACHE_BYTES = 32 << 20


class TiffSlide(Slide):
    """Plain (possibly stripped, possibly single-level) TIFF read segment by segment."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        self._file_lock = threading.Lock()  # one file position: threads must not interleave seek and read
        # Decoded tiles, most recently used last: neighbouring reads share tiles, and decoding
        # is what a read costs. A tile being decoded is in ``_decoding``, for other threads to wait on.
        self._tiles: OrderedDict[tuple[int, int], tuple[np.ndarray, int, int]] = OrderedDict()
        self._tile_bytes = 0
        self._decoding: dict[tuple[int, int], threading.Event] = {}
        self._cache_lock = threading.Lock()
        try:
            self._pages = self._find_levels()
            self._check_complete()
        except BaseException:
            self._tif.close()
            raise
        base = self._pages[0]
        self._dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        self._ds = tuple(float(base.imagewidth / p.imagewidth + base.imagelength / p.imagelength) / 2 for p in self._pages)
        self._props = MappingProxyType(self._collect_properties())

    def _find_levels(self) -> list:
        series = self._tif.series[0] if self._tif.series else None
        if series is not None and len(series.levels) > 1:
            pages = [lvl.keyframe for lvl in series.levels]
        else:
            base = self._tif.pages[0]
            pages = [base]
            aspect = base.imagewidth / base.imagelength
            # Reduced-resolution pages of the same aspect ratio form the pyramid; thumbnails,
            # labels and macro images have other aspect ratios or are not smaller.
            for page in list(self._tif.pages)[1:]:
                page = page.keyframe if hasattr(page, "keyframe") else page
                if page.imagewidth >= pages[-1].imagewidth or page.imagelength < 1:
                    continue
                if abs(page.imagewidth / page.imagelength - aspect) / aspect > 0.02:
                    continue
                pages.append(page)
        for page in pages:
            if page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4) or page.planarconfig != 1:
                raise SlideOpenError(
                    f"{self.path}: unsupported TIFF pixel layout ({page.dtype}, {page.samplesperpixel} samples, "
                    f"planar config {page.planarconfig}); convert it to 8-bit RGB, e.g. with `vips tiffsave --tile --pyramid`"
                )
        return pages

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for level, page in enumerate(self._pages):
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if not ends:
                raise SlideOpenError(f"{self.path}: level {level} holds no image data; the file is incomplete")
            if max(ends) > size:
                raise SlideOpenError(
                    f"{self.path}: truncated file: level {level} data ends at byte {max(ends)} but the file has "
                    f"{size} bytes; copy the slide again"
                )

    def _collect_properties(self) -> dict[str, str]:
        page = self._tif.pages[0]
        props: dict[str, str] = {"tifffile.pages": str(len(self._tif.pages))}
        for tag in page.tags.values():
            value = tag.value
            if isinstance(value, (str, int, float)) or (isinstance(value, tuple) and len(value) <= 4):
                props[f"tiff.{tag.name}"] = str(value)
        return props

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims  # type: ignore[return-value]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._ds

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    @property
    def vendor(self) -> str:
        return "tiff"

    def native_mpp(self) -> tuple[float, float, str] | None:
        page = self._pages[0]
        match = _APERIO_MPP.search(page.description or "")
        if match:
            mpp = float(match.group(1))
            return mpp, mpp, "aperio.MPP"
        unit = int(page.resolutionunit)
        per_um = {2: 1 / 25400.0, 3: 1 / 10000.0}.get(unit)  # RESUNIT INCH, CENTIMETER
        x_res, y_res = page.resolution
        if per_um is None or not x_res or not y_res:
            return None
        return 1 / (x_res * per_um), 1 / (y_res * per_um), "tiff.XResolution"

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # Tiles decode to arrays: no round trip through a PIL image.
        return self._guarded(self._read_array, location, level, size)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        return Image.fromarray(self._read_array(x, y, level, width, height))

    def _read_array(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        ds = self._ds[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        iw, ih = int(page.imagewidth), int(page.imagelength)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, iw), min(ly + height, ih)
        if x0 >= x1 or y0 >= y1:
            return out
        if page.is_tiled:
            sw, sh = int(page.tilewidth), int(page.tilelength)
        else:
            sw, sh = iw, int(min(page.rowsperstrip, ih))
        across = -(-iw // sw)
        for ty in range(y0 // sh, (y1 - 1) // sh + 1):
            for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                tile = self._tile(level, ty * across + tx)
                if tile is None:
                    continue  # sparse tile: stays white
                seg, sy, sx = tile
                # Intersect this segment with the requested window.
                ax0, ay0 = max(x0, sx), max(y0, sy)
                ax1, ay1 = min(x1, sx + seg.shape[1], iw), min(y1, sy + seg.shape[0], ih)
                if ax0 < ax1 and ay0 < ay1:
                    out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return out

    def largest_tile(self, level: int) -> tuple[int, int, int, int] | None:
        """``x, y, width, height`` (level pixels) of the tile of ``level`` that takes the most bytes
        in the file (the most detailed one), or None for a level stored in strips or empty."""
        page = self._pages[level]
        counts = np.asarray(page.databytecounts)
        if not page.is_tiled or not counts.any():
            return None
        index = int(np.argmax(counts))
        tw, th, iw, ih = int(page.tilewidth), int(page.tilelength), int(page.imagewidth), int(page.imagelength)
        across = -(-iw // tw)
        x, y = index % across * tw, index // across * th
        return x, y, min(tw, iw - x), min(th, ih - y)

    def _tile(self, level: int, index: int) -> tuple[np.ndarray, int, int] | None:
        """Decoded RGB tile (or strip) ``index`` of ``level`` and its top-left y, x; None if sparse."""
        key = (level, index)
        while True:
            with self._cache_lock:
                if key in self._tiles:
                    self._tiles.move_to_end(key)
                    return self._tiles[key]
                pending = self._decoding.get(key)
                if pending is None:
                    pending = self._decoding[key] = threading.Event()
                    break
            pending.wait()  # another thread decodes it; take it from the cache (or decode it if that failed)
        tile = None
        try:
            page = self._pages[level]
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if not count:
                return None
            with self._file_lock:
                self._tif.filehandle.seek(offset)
                data = self._tif.filehandle.read(count)
            seg, pos, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = (_to_rgb(seg[0]), int(pos[2]), int(pos[3]))
            return tile
        finally:
            with self._cache_lock:
                del self._decoding[key]
                if tile is not None:
                    self._tiles[key] = tile
                    self._tile_bytes += tile[0].nbytes
                    while self._tile_bytes > _TILE_CACHE_BYTES and len(self._tiles) > 1:
                        self._tile_bytes -= self._tiles.popitem(last=False)[1][0].nbytes
            pending.set()

    def close(self) -> None:
        self._tiles.clear()
        self._tile_bytes = 0
        self._tif.close()


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    # tifffile logs structural problems (e.g. a truncated page chain) as errors; the
    # open error we raise already says what is wrong, so keep the screen clean.
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def dicom_series_file(folder: str | Path) -> Path:
    """The file OpenSlide opens for the DICOM slide in ``folder``, once every ``.dcm`` file there
    is known to belong to one series.

    OpenSlide opens the series of the file it is given and passes over the other files of
    the folder, so a second series (another slide) or a file it cannot read (a copy cut
    short, a non-image DICOM object) would go unnoticed; they are refused here, by name.
    """
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise SlideOpenError(f"{folder}: a folder without DICOM (.dcm) files; pass a slide file, or a folder holding "
                             "the .dcm files of one DICOM whole-slide image series")
    try:
        import openslide
    except ImportError as exc:
        raise SlideOpenError(f"{folder}: DICOM slides are read by OpenSlide 4, which is unavailable ({exc}); "
                             "install openslide-python and openslide-bin") from exc
    series: dict[str, list[Path]] = {}
    unreadable: list[str] = []
    for file in files:
        try:
            with openslide.OpenSlide(str(file)) as osr:
                series.setdefault(osr.properties.get("dicom.SeriesInstanceUID", ""), []).append(file)
        except (openslide.OpenSlideError, OSError) as exc:
            unreadable.append(f"{file.name} ({exc})")
    if unreadable:
        count = f"reads none of its {len(files)}" if not series else f"cannot read {len(unreadable)} of its {len(files)}"
        raise SlideOpenError(
            f"{folder}: OpenSlide {count} .dcm file(s) as a DICOM whole-slide image: "
            f"{'; '.join(unreadable[:3])}{' …' if len(unreadable) > 3 else ''}. A DICOM slide folder holds only the "
            "whole-slide image files of one series: copy a file cut short again, or move other files out of the folder"
        )
    if len(series) > 1:
        found = "; ".join(f"series {uid or '(no SeriesInstanceUID)'}: {len(group)} file(s), e.g. {group[0].name}"
                          for uid, group in series.items())
        raise SlideOpenError(f"{folder}: holds {len(series)} DICOM series ({found}); a folder is one slide, so move "
                             "each series into a folder of its own")
    return files[0]


def open_slide(path: str | Path) -> Slide:
    """Open ``path`` with OpenSlide, falling back to tifffile for TIFFs OpenSlide refuses.

    A folder (or a ``.dcm`` file in it) is opened as one DICOM series; the slide's path is
    then the folder. Raises :class:`SlideOpenError` with the file name and the reason
    (missing, empty, truncated, not a slide, several DICOM series) when it cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    path = slide_of(path)
    if path.is_dir():
        return OpenSlideSlide(path, dicom_series_file(path))
    if path.stat().st_size == 0:
        raise SlideOpenError(f"{path}: file is empty (0 bytes); the copy or scan did not finish")
    errors: list[str] = []
    try:
        import openslide

        try:
            return OpenSlideSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            errors.append("OpenSlide: unsupported or unreadable format")
        except openslide.OpenSlideError as exc:
            errors.append(f"OpenSlide: {exc}")
    except ImportError as exc:  # openslide-bin missing: tifffile still reads TIFFs
        errors.append(f"OpenSlide unavailable ({exc})")
    try:
        import tifffile

        try:
            with _quiet_tifffile():
                return TiffSlide(path)
        except SlideOpenError:
            raise
        except (tifffile.TiffFileError, ValueError, IndexError, OSError, KeyError) as exc:
            errors.append(f"tifffile: {exc}")
    except ImportError as exc:
        errors.append(f"tifffile unavailable ({exc})")
    raise SlideOpenError(f"{path}: cannot open as a slide ({'; '.join(errors)}); is it a whole-slide image, and complete?")
