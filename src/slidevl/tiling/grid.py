"""One global grid per slide, anchored at level-0 (0, 0) and defined in physical units.

Patches are ``patch_px`` pixels at ``target_mpp``. Regions are ``region_patches`` x
``region_patches`` patches and packs are ``pack_size`` x ``pack_size`` patches, both
indexed on the same patch lattice, so every patch nests exactly in one region and one
pack whatever the scan resolution.

The level-0 size of a patch is a float (``patch_px * target_mpp / mpp``); mpp is never
rounded. Cell boundaries are ``round(i * step)``, which is monotone in ``i``: adjacent
patches share an edge, and a patch's extent lies inside its region's extent exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidevl.config import Config, setting
from slidevl.errors import ConfigError


@dataclass(frozen=True)
class GridSpec(Config):
    """Physical definition of the patch / region / pack lattice."""

    target_mpp: float = setting(0.5, help="Target microns per pixel of patches (0.5 = 20x).")
    patch_px: int = setting(256, help="Patch edge in pixels at the target mpp.")
    region_patches: int = setting(16, help="Patches per region edge (16 x 256 px = 4096 px regions).")
    pack_size: int = setting(3, help="Patches per pack edge (3 = 3x3 packs).")

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ConfigError(f"target_mpp must be > 0, got {self.target_mpp}")
        for name in ("patch_px", "region_patches", "pack_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def region_px(self) -> int:
        """Region edge in pixels at the target mpp (4096 by default)."""
        return self.patch_px * self.region_patches


@dataclass(frozen=True)
class SlideGrid:
    """The lattice of one slide: level-0 dimensions plus the slide's own mpp."""

    spec: GridSpec
    width: int
    height: int
    mpp: float

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ValueError(f"slide mpp must be > 0, got {self.mpp}")

    @property
    def patch_step(self) -> float:
        """Patch edge in level-0 pixels (float; 256 at 0.5 µm/px for 0.5 target)."""
        return self.spec.patch_px * self.spec.target_mpp / self.mpp

    @property
    def region_step(self) -> float:
        return self.patch_step * self.spec.region_patches

    @property
    def pack_step(self) -> float:
        return self.patch_step * self.spec.pack_size

    @property
    def n_cols(self) -> int:
        """Number of whole patch columns that fit inside the slide."""
        return int(np.floor(self.width / self.patch_step + 1e-9))

    @property
    def n_rows(self) -> int:
        return int(np.floor(self.height / self.patch_step + 1e-9))

    def patch_edges(self, index: np.ndarray) -> np.ndarray:
        """Level-0 pixel coordinate of the left/top edge of patch column/row ``index``."""
        return np.rint(np.asarray(index, dtype=np.float64) * self.patch_step).astype(np.int64)

    def patch_boxes(self, grid: np.ndarray) -> np.ndarray:
        """(N, 4) level-0 boxes ``x0, y0, x1, y1`` (x1/y1 exclusive) for (col, row) pairs."""
        grid = np.asarray(grid, dtype=np.int64).reshape(-1, 2)
        lo = self.patch_edges(grid)
        hi = self.patch_edges(grid + 1)
        return np.concatenate([lo, hi], axis=1)

    def all_patches(self) -> np.ndarray:
        """(n_rows * n_cols, 2) array of every (col, row) in row-major order."""
        cols, rows = np.meshgrid(np.arange(self.n_cols), np.arange(self.n_rows))
        return np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.int64)

    def region_of(self, grid: np.ndarray) -> np.ndarray:
        """(N, 2) region (col, row) of each patch (col, row)."""
        return np.asarray(grid, dtype=np.int64) // self.spec.region_patches

    def pack_of(self, grid: np.ndarray) -> np.ndarray:
        """(N, 2) pack (col, row) of each patch (col, row)."""
        return np.asarray(grid, dtype=np.int64) // self.spec.pack_size

    def pack_slot(self, grid: np.ndarray) -> np.ndarray:
        """(N,) position of a patch inside its pack, row-major in ``0 .. pack_size**2 - 1``."""
        grid = np.asarray(grid, dtype=np.int64)
        k = self.spec.pack_size
        return (grid[:, 1] % k) * k + grid[:, 0] % k

    def cell_boxes(self, cell_grid: np.ndarray, cell_patches: int) -> np.ndarray:
        """(N, 4) level-0 boxes of regions or packs given their (col, row) and size in patches."""
        cell_grid = np.asarray(cell_grid, dtype=np.int64).reshape(-1, 2)
        lo = self.patch_edges(cell_grid * cell_patches)
        hi = self.patch_edges((cell_grid + 1) * cell_patches)
        return np.concatenate([lo, hi], axis=1)


def index_cells(cell_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique cells (sorted row-major) and, for each input row, its index into them.

    Used to turn per-patch region/pack (col, row) pairs into compact region/pack tables.
    """
    cell_grid = np.asarray(cell_grid, dtype=np.int64).reshape(-1, 2)
    # Sort by (row, col) so tables read in the natural raster order.
    keys = cell_grid[:, [1, 0]]
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return uniq[:, [1, 0]], inverse.reshape(-1).astype(np.int64)
