"""Tissue polygons from QuPath-style GeoJSON, and their area inside a rectangle.

Only what the viewer needs: parse Polygon/MultiPolygon features (level-0 coordinates)
and measure the area of the part inside an axis-aligned box. The box is convex, so
Sutherland–Hodgman clipping followed by the shoelace formula gives the exact area even
for concave rings; holes are subtracted the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from slidevl.errors import InputError

Ring = np.ndarray  # (K, 2) float64, open (last point != first)
Polygon = list[Ring]  # outer ring first, then holes


class GeoJSONError(InputError):
    """The GeoJSON does not hold Polygon/MultiPolygon features in level-0 coordinates."""


def _ring(coords: Any) -> Ring:
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3:
        raise GeoJSONError("a polygon ring must be a list of at least 3 [x, y] points")
    arr = arr[:, :2]
    if np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    return arr


def polygons_from_geojson(obj: Any) -> list[Polygon]:
    """All polygons of a FeatureCollection / Feature / geometry, as lists of rings."""
    if not isinstance(obj, dict):
        raise GeoJSONError("GeoJSON root must be an object")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        feats = obj.get("features")
        if not isinstance(feats, list):
            raise GeoJSONError("FeatureCollection without a 'features' list")
        return [p for f in feats for p in polygons_from_geojson(f)]
    if kind == "Feature":
        geom = obj.get("geometry")
        return polygons_from_geojson(geom) if geom else []
    if kind == "Polygon":
        return [[_ring(r) for r in obj.get("coordinates", [])]]
    if kind == "MultiPolygon":
        return [[_ring(r) for r in poly] for poly in obj.get("coordinates", [])]
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries", []) for p in polygons_from_geojson(g)]
    # Points and lines carry no area; QuPath exports may mix them in.
    if kind in {"Point", "MultiPoint", "LineString", "MultiLineString"}:
        return []
    raise GeoJSONError(f"unsupported GeoJSON type {kind!r}")


def shoelace(ring: Ring) -> float:
    """Unsigned area of a simple ring."""
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def clip_ring(ring: Ring, bbox: Sequence[float]) -> Ring:
    """Sutherland–Hodgman clip of ``ring`` to the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = bbox
    # Each edge: (axis, bound, keep points with coordinate >= bound if sign > 0 else <= bound).
    edges = ((0, x0, 1), (0, x1, -1), (1, y0, 1), (1, y1, -1))
    pts = [tuple(p) for p in ring]
    for axis, bound, sign in edges:
        if not pts:
            break
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cur_in = sign * (cur[axis] - bound) >= 0
            prev_in = sign * (prev[axis] - bound) >= 0
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(prev[k] + t * (cur[k] - prev[k]) for k in range(2)))
            if cur_in:
                out.append(cur)
        pts = out
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def area_px(polygons: list[Polygon], bbox: Sequence[float] | None = None) -> float:
    """Total area (level-0 px²) of ``polygons``, optionally restricted to ``bbox``."""
    total = 0.0
    for poly in polygons:
        for k, ring in enumerate(poly):
            a = shoelace(ring if bbox is None else clip_ring(ring, bbox))
            total += a if k == 0 else -a
    return max(total, 0.0)
