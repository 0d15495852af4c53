"""Tissue masks as QuPath-compatible GeoJSON, in level-0 pixel coordinates.

Each 8-connected tissue piece becomes one ``Feature`` with a ``Polygon`` geometry (outer
ring first, then its holes), ``"objectType": "annotation"`` and the classification
``Tissue``, which is what QuPath's *Import objects* expects. Rings are closed, outer
rings counter-clockwise and holes clockwise in the usual y-up sense (RFC 7946).
"""

from __future__ import annotations

import uuid

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from slidevl.slide.morphology import components
from slidevl.slide.tissue import TissueMask

TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}
# Simplification tolerance in mask pixels: removes the staircase, keeps the outline.
_SIMPLIFY_PX = 0.75
_NAMESPACE = uuid.UUID("5b0f8f4e-7f65-4a0e-9d39-0c1c5a1f4e21")


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def mask_polygons(tissue: TissueMask) -> list[list[np.ndarray]]:
    """Polygons as lists of closed (K, 2) level-0 x, y rings: ``[outer, hole, hole, ...]``."""
    mask = tissue.mask
    labels, _ = components(mask)  # 8-connected
    polygons: list[list[np.ndarray]] = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        piece = np.pad(labels[sl] == index, 1).astype(np.float32)
        # 'high' joins diagonal neighbours, matching the 8-connected labelling above.
        rings = []
        for contour in find_contours(piece, 0.5, fully_connected="high"):
            contour = approximate_polygon(contour, _SIMPLIFY_PX)
            if len(contour) < 4:
                continue
            rows = contour[:, 0] - 1 + sl[0].start
            cols = contour[:, 1] - 1 + sl[1].start
            # Mask pixel (r, c) covers level-0 [c*sx, (c+1)*sx); its centre is at c + 0.5.
            ring = np.stack([(cols + 0.5) * tissue.scale_x, (rows + 0.5) * tissue.scale_y], axis=1)
            ring[-1] = ring[0]
            if abs(_signed_area(ring)) > 0:
                rings.append(ring)
        if not rings:
            continue
        rings.sort(key=lambda r: abs(_signed_area(r)), reverse=True)
        outer, holes = rings[0], rings[1:]
        outer = outer if _signed_area(outer) > 0 else outer[::-1]
        holes = [h if _signed_area(h) < 0 else h[::-1] for h in holes]
        polygons.append([outer, *holes])
    return polygons


def tissue_geojson(tissue: TissueMask, slide_id: str) -> dict:
    """FeatureCollection of the mask's tissue annotations."""
    return polygons_geojson(mask_polygons(tissue), slide_id)


def polygons_geojson(polygons: list[list[np.ndarray]], slide_id: str) -> dict:
    """FeatureCollection of tissue annotations (deterministic ids, so reruns are identical)."""
    features = []
    for i, rings in enumerate(polygons):
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{slide_id}/{i}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [np.round(r, 2).tolist() for r in rings],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": f"Tissue {i + 1}",
                    "classification": dict(TISSUE_CLASS),
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
