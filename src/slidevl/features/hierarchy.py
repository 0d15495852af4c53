"""Patch -> region -> pack tables and region features pooled from the patch grid.

Both the preprocessing pipeline and the CLAM/TRIDENT importer go through here, so a
slide's region and pack tables mean the same thing whatever produced its patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slidevl.tiling.grid import SlideGrid, index_cells

# Memory budget for one chunk of (R, k, k, D) region grids handed to the region encoder.
_REGION_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class Hierarchy:
    """Kept patches with their region and pack tables (row-major order throughout)."""

    patch_grid: np.ndarray  # (N, 2) col, row
    region_index: np.ndarray  # (N,)
    region_grid: np.ndarray  # (R, 2)
    region_coords: np.ndarray  # (R, 2) level-0 x, y
    pack_index: np.ndarray  # (N,)
    pack_grid: np.ndarray  # (P, 2)
    pack_coords: np.ndarray  # (P, 2)
    pack_boxes: np.ndarray  # (P, 4) level-0 x0, y0, x1, y1


def build_hierarchy(grid: SlideGrid, patch_grid: np.ndarray) -> Hierarchy:
    """Region and pack tables of the patches at ``patch_grid`` on ``grid``."""
    patch_grid = np.asarray(patch_grid, dtype=np.int64).reshape(-1, 2)
    region_grid, region_index = index_cells(grid.region_of(patch_grid))
    pack_grid, pack_index = index_cells(grid.pack_of(patch_grid))
    pack_boxes = grid.cell_boxes(pack_grid, grid.spec.pack_size)
    return Hierarchy(
        patch_grid=patch_grid,
        region_index=region_index,
        region_grid=region_grid,
        region_coords=grid.cell_boxes(region_grid, grid.spec.region_patches)[:, :2],
        pack_index=pack_index,
        pack_grid=pack_grid,
        pack_coords=pack_boxes[:, :2],
        pack_boxes=pack_boxes,
    )


def encode_regions(features: np.ndarray, hierarchy: Hierarchy, region_patches: int, region_encoder: Any) -> np.ndarray:
    """(R, D') region features from the region encoder over each region's k x k patch grid.

    Regions are encoded in chunks whose dense grids fit a fixed memory budget, so the
    cost does not grow with the slide beyond the (N, D) patch features themselves.
    """
    features = np.asarray(features, dtype=np.float32)
    n, dim = features.shape
    k = region_patches
    n_regions = len(hierarchy.region_grid)
    out = np.empty((n_regions, int(region_encoder.output_dim(dim))), dtype=np.float32)
    order = np.argsort(hierarchy.region_index, kind="stable")
    bounds = np.searchsorted(hierarchy.region_index[order], np.arange(n_regions + 1))
    chunk = max(1, _REGION_CHUNK_BYTES // (k * k * max(dim, 1) * 4))
    for r0 in range(0, n_regions, chunk):
        r1 = min(n_regions, r0 + chunk)
        idx = order[bounds[r0] : bounds[r1]]
        dense = np.zeros((r1 - r0, k, k, dim), dtype=np.float32)
        present = np.zeros((r1 - r0, k, k), dtype=bool)
        local = hierarchy.region_index[idx] - r0
        cols = hierarchy.patch_grid[idx, 0] % k
        rows = hierarchy.patch_grid[idx, 1] % k
        dense[local, rows, cols] = features[idx]
        present[local, rows, cols] = True
        encoded = region_encoder.encode(dense, present)
        out[r0:r1] = to_numpy(encoded)
    return out


def to_numpy(x: Any) -> np.ndarray:
    """float32 numpy array from a numpy array or a (possibly accelerator) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
