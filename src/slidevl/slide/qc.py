"""QC picture: the slide overview with tissue contours, the region grid and kept patches."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from slidevl.tiling.grid import SlideGrid

_KEPT_FILL = (40, 90, 255, 70)
_KEPT_EDGE = (40, 90, 255, 170)
_REGION_LINE = (255, 140, 0, 200)
_CONTOUR = (0, 170, 0, 255)


def render_qc(overview: np.ndarray, grid: SlideGrid, kept: np.ndarray, polygons: list[list[np.ndarray]],
              *, max_side: int = 2048) -> Image.Image:
    """Overview (any scale) with contours, region lattice and kept patches highlighted.

    ``kept`` is the (N, 2) (col, row) of kept patches; ``polygons`` are level-0 rings as
    returned by :func:`slidevl.slide.geojson.mask_polygons`.
    """
    base = Image.fromarray(overview)
    factor = min(1.0, max_side / max(base.size))
    if factor < 1.0:
        base = base.resize((max(1, round(base.width * factor)), max(1, round(base.height * factor))), Image.Resampling.BOX)
    fx, fy = base.width / grid.width, base.height / grid.height
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    boxes = grid.patch_boxes(kept).astype(np.float64) * np.array([fx, fy, fx, fy])
    outline = boxes.size and np.median(boxes[:, 2] - boxes[:, 0]) >= 4
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=_KEPT_FILL, outline=_KEPT_EDGE if outline else None)
    region = grid.region_step
    for i in range(int(grid.width / region) + 1):
        x = grid.patch_edges(i * grid.spec.region_patches) * fx
        draw.line([(x, 0), (x, base.height)], fill=_REGION_LINE, width=1)
    for j in range(int(grid.height / region) + 1):
        y = grid.patch_edges(j * grid.spec.region_patches) * fy
        draw.line([(0, y), (base.width, y)], fill=_REGION_LINE, width=1)
    for rings in polygons:
        for ring in rings:
            draw.line([(float(x) * fx, float(y) * fy) for x, y in ring], fill=_CONTOUR, width=2)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
