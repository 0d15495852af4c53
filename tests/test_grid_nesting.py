"""Every stored patch lies inside its region and its pack, whatever the scan mpp."""

from __future__ import annotations

import numpy as np
import pytest

from slide_fixtures import write_aperio_slide
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore
from slidevl.tiling.grid import GridSpec, SlideGrid

# Small patches and regions so a 2k slide holds many of each (and many rounding cases).
SPEC = GridSpec(target_mpp=0.5, patch_px=64, region_patches=4, pack_size=3)
MPPS = {"half": 0.5, "quarter": 0.25, "odd": 0.2527}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("nesting")
    for name, mpp in MPPS.items():
        write_aperio_slide(root / f"{name}.svs", 2048, 1536, mpp=mpp)
    report = preprocess(root, root / "job", PreprocessConfig(grid=SPEC, workers=0, progress=False))
    assert report.exit_code == 0, [r.error for r in report.results]
    return FeatureStore(root / "job")


def _inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    return bool(
        (inner[:, 0] >= outer[:, 0]).all() and (inner[:, 1] >= outer[:, 1]).all()
        and (inner[:, 2] <= outer[:, 2]).all() and (inner[:, 3] <= outer[:, 3]).all()
    )


@pytest.mark.parametrize("name", sorted(MPPS))
def test_patches_nest_in_regions_and_packs(store, name):
    mpp = MPPS[name]
    sf = store.load(name)
    grid = SlideGrid(SPEC, sf.attrs["slide_width"], sf.attrs["slide_height"], mpp)
    # Physical sizes are floats at level 0: no rounding of the mpp or of the step.
    assert sf.attrs["mpp"] == mpp and sf.attrs["patch_size_level0"] == 64 * 0.5 / mpp
    assert sf.attrs["region_size_level0"] == 4 * 64 * 0.5 / mpp
    assert sf.n_patches > 50 and len(sf.region_grid) > 3 and len(sf.pack_grid) > 5

    patches = grid.patch_boxes(sf.patch_grid)
    regions = grid.cell_boxes(sf.region_grid, SPEC.region_patches)[sf.patch_region]
    packs = grid.cell_boxes(sf.pack_grid, SPEC.pack_size)[sf.patch_pack]
    assert np.array_equal(sf.patch_coords, patches[:, :2])
    assert _inside(patches, regions) and _inside(patches, packs)
    assert np.array_equal(sf.region_grid[sf.patch_region], sf.patch_grid // SPEC.region_patches)
    assert np.array_equal(sf.pack_grid[sf.patch_pack], sf.patch_grid // SPEC.pack_size)
    assert np.array_equal(sf.region_coords, grid.cell_boxes(sf.region_grid, SPEC.region_patches)[:, :2])
    assert np.array_equal(sf.pack_coords, grid.cell_boxes(sf.pack_grid, SPEC.pack_size)[:, :2])
    # Patch edges are the rounded float lattice: widths differ by at most one pixel.
    widths = patches[:, 2] - patches[:, 0]
    assert set(np.unique(widths)) <= {int(np.floor(grid.patch_step)), int(np.ceil(grid.patch_step))}
    assert patches[:, 2].max() <= grid.width and patches[:, 3].max() <= grid.height


def test_neighbours_share_edges(store):
    sf = store.load("odd")
    grid = SlideGrid(SPEC, sf.attrs["slide_width"], sf.attrs["slide_height"], MPPS["odd"])
    boxes = {tuple(g): b for g, b in zip(sf.patch_grid.tolist(), grid.patch_boxes(sf.patch_grid))}
    pairs = 0
    for (c, r), box in boxes.items():
        right = boxes.get((c + 1, r))
        if right is not None:
            assert right[0] == box[2]
            pairs += 1
    assert pairs > 20
