"""Tiny synthetic slides for the slide/preprocess tests.

The writers produce the layouts OpenSlide and the tifffile fallback must handle:

* an Aperio-style pyramid (level 0 tiled JPEG with an Aperio description, reduced
  levels /4 written as ``subfiletype=1`` pages without tifffile metadata),
* the same without ``MPP`` in the description,
* a plain stripped TIFF with a centimetre resolution (OpenSlide refuses it),
* broken files: zero bytes, truncated, not an image at all.

Tissue is a set of pink ellipses with purple "nuclei" on a near-white background, so
the tests know exactly where tissue is (``Blob``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


@dataclass(frozen=True)
class Blob:
    """An elliptical tissue piece in level-0 pixels."""

    cx: float
    cy: float
    rx: float
    ry: float


DEFAULT_BLOBS = (Blob(0.35, 0.4, 0.22, 0.25), Blob(0.72, 0.65, 0.15, 0.2))


def tissue_image(width: int, height: int, *, seed: int = 0, blobs: tuple[Blob, ...] = DEFAULT_BLOBS) -> np.ndarray:
    """RGB uint8 image with pink/purple tissue blobs (blob geometry relative to size)."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[...] = (244, 243, 246)
    for blob in blobs:
        # Work inside each blob's bounding box so large fixtures stay cheap.
        x0, x1 = max(0, int((blob.cx - blob.rx) * width)), min(width, int((blob.cx + blob.rx) * width) + 1)
        y0, y1 = max(0, int((blob.cy - blob.ry) * height)), min(height, int((blob.cy + blob.ry) * height) + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = ((xx - blob.cx * width) / (blob.rx * width)) ** 2 + ((yy - blob.cy * height) / (blob.ry * height)) ** 2 <= 1
        img[y0:y1, x0:x1][inside] = (222, 150, 192)
    # Nuclei: small dark dots inside tissue give the encoders some texture to see.
    ys, xs = np.nonzero(img[::8, ::8, 1] < 200)
    if len(ys):
        pick = rng.choice(len(ys), size=max(1, len(ys) * 64 // 900), replace=True)
        for y, x in zip(ys[pick] * 8 + rng.integers(0, 8, len(pick)), xs[pick] * 8 + rng.integers(0, 8, len(pick))):
            img[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4] = (110, 60, 150)
    noise = rng.integers(-6, 7, size=img.shape, dtype=np.int8)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def blob_mask(width: int, height: int, blobs: tuple[Blob, ...] = DEFAULT_BLOBS) -> np.ndarray:
    """Boolean truth mask of the blobs at the given size."""
    yy, xx = np.ogrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    for blob in blobs:
        cx, cy, rx, ry = blob.cx * width, blob.cy * height, blob.rx * width, blob.ry * height
        mask |= ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
    return mask


def _levels(img: np.ndarray, factor: int = 4, min_side: int = 64) -> list[np.ndarray]:
    levels = [img]
    while min(levels[-1].shape[:2]) // factor >= min_side:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // factor, h // factor), Image.BILINEAR)))
    return levels


def write_aperio_slide(path: Path, width: int = 2048, height: int = 1536, *, mpp: float | None = 0.5,
                       seed: int = 0, blobs: tuple[Blob, ...] = DEFAULT_BLOBS,
                       image: np.ndarray | None = None) -> Path:
    """Aperio-layout pyramidal TIFF (.svs); ``mpp=None`` leaves the MPP out of the description."""
    path = Path(path)
    img = tissue_image(width, height, seed=seed, blobs=blobs) if image is None else image
    height, width = img.shape[:2]
    desc = f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=90|AppMag = 20"
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, level in enumerate(_levels(img)):
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                description=desc if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


def write_plain_tiff(path: Path, width: int = 1024, height: int = 768, *, mpp: float = 0.5, seed: int = 0) -> Path:
    """Single-level stripped RGB TIFF with a centimetre resolution: OpenSlide cannot open it."""
    img = tissue_image(width, height, seed=seed)
    per_cm = 1e4 / mpp
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=64, resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER", metadata=None)
    return Path(path)


def write_truncated_slide(path: Path, width: int = 2048, height: int = 1536, keep: float = 0.5) -> Path:
    """An Aperio slide cut after ``keep`` of its bytes (an interrupted copy)."""
    write_aperio_slide(path, width, height)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_blank_slide(path: Path, width: int = 2048, height: int = 1536) -> Path:
    """A valid slide with no tissue at all (white glass)."""
    return write_aperio_slide(path, width, height, blobs=())


def write_zero_byte(path: Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def write_not_a_slide(path: Path) -> Path:
    Path(path).write_text("this is not an image\n")
    return Path(path)


def write_corrupt_slide(path: Path, width: int = 2048, height: int = 1536) -> Path:
    """A slide that opens but whose level-0 tiles in the tissue are zeroed (unreadable JPEG)."""
    write_aperio_slide(path, width, height)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as fh:
        for offset, count in spans[len(spans) // 3 : 2 * len(spans) // 3]:
            fh.seek(offset)
            fh.write(b"\0" * count)
    return Path(path)
