"""ROI growth over the patch graph and windows cut by physical size (slidevl.vqa.roi, slidevl.vqa.windows)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from slide_fixtures import Blob, write_aperio_slide
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore, SlideFeatures
from slidevl.serve.overlays import parse_rois
from slidevl.vqa.roi import METHODS, grow_rois, neighbour_graph, patch_boxes, roi_labels
from slidevl.vqa.windows import (
    DEFAULT_WINDOWS,
    WindowError,
    WindowSpec,
    box_tissue_fractions,
    plan_windows,
    window_box,
)


def _tissue_grid(rng: np.random.Generator, shape=(18, 22)) -> np.ndarray:
    """(col, row) cells of two irregular tissue pieces that do not touch."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    a = ((rows - 6) / 5.5) ** 2 + ((cols - 6) / 5) ** 2 < 1
    b = ((rows - 11) / 6) ** 2 + ((cols - 16) / 4.5) ** 2 < 1
    mask = (a | b) & (rng.random(shape) > 0.08)  # a few holes
    r, c = np.nonzero(mask)
    return np.stack([c, r], axis=1)


def _assert_partition_and_connected(labels: np.ndarray, grid: np.ndarray) -> None:
    assert labels.shape == (len(grid),)
    assert (labels >= 0).all()
    for lab in np.unique(labels):
        cells = grid[labels == lab]
        mask = np.zeros(grid.max(0)[::-1] + 1, dtype=bool)
        mask[cells[:, 1], cells[:, 0]] = True
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == 1, f"ROI {lab} falls into {n} 8-connected pieces"


@pytest.mark.parametrize("method", METHODS)
def test_rois_cover_every_patch_once_and_are_8_connected(method):
    rng = np.random.default_rng(1)
    grid = _tissue_grid(rng)
    features = rng.normal(size=(len(grid), 12)) + (grid[:, :1] > 10) * 2.0
    labels, seeds = roi_labels(features, grid, 5, seed=3, method=method, min_fraction=0)
    _assert_partition_and_connected(labels, grid)
    assert len(np.unique(labels)) == 5 == len(seeds)
    assert (labels[seeds] == np.arange(len(seeds))).all()  # each seed leads its own ROI
    # Every tissue piece needs its own seed, so asking for fewer ROIs than pieces still covers both.
    one, _ = roi_labels(features, grid, 1, seed=3, method=method)
    _assert_partition_and_connected(one, grid)
    assert len(np.unique(one)) == 2
    # Small ROIs merge into neighbours: each merged ROI is a union of grown ones, big enough, still connected.
    merged, kept = roi_labels(features, grid, 5, seed=3, method=method, min_fraction=0.2)
    _assert_partition_and_connected(merged, grid)
    assert set(kept.tolist()) <= set(seeds.tolist())
    for lab in np.unique(labels):
        assert len(np.unique(merged[labels == lab])) == 1
    assert np.bincount(merged).min() >= 0.2 * len(grid)  # both tissue pieces are larger than that


@pytest.mark.parametrize("method", METHODS)
def test_rois_are_deterministic_by_seed(method):
    rng = np.random.default_rng(2)
    grid = _tissue_grid(rng)
    features = rng.normal(size=(len(grid), 8))
    a, _ = roi_labels(features, grid, 4, seed=7, method=method)
    b, _ = roi_labels(features.copy(), grid.copy(), 4, seed=7, method=method)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_two_planted_textures_are_recovered(method):
    # A 24x16 grid whose left 10 columns carry one texture and the rest another,
    # with noise well below the difference: two ROIs must split along the boundary.
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:16, :24]
    grid = np.stack([cols.ravel(), rows.ravel()], axis=1)
    truth = (grid[:, 0] >= 10).astype(int)
    centres = rng.normal(size=(2, 32)) * 3
    features = centres[truth] + rng.normal(size=(len(grid), 32)) + 5.0  # positive offset, as many encoders have
    for seed in range(3):
        labels, _ = roi_labels(features, grid, 2, seed=seed, method=method)
        agreement = max((labels == truth).mean(), (labels != truth).mean())
        assert agreement >= 0.97, (seed, agreement)


def test_neighbour_graph_lists_each_8_neighbour_edge_once():
    grid = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [3, 3]])
    src, dst = neighbour_graph(grid)
    edges = {tuple(sorted(e)) for e in zip(src.tolist(), dst.tolist())}
    assert len(edges) == len(src) == 6  # the 2x2 block is a complete graph; (3,3) is alone
    with pytest.raises(ValueError, match="duplicate"):
        neighbour_graph(np.array([[0, 0], [0, 0]]))


def _features(grid: np.ndarray, mpp: float, step: float, rng: np.random.Generator) -> SlideFeatures:
    n = len(grid)
    coords = np.rint(grid * step).astype(np.int64)
    return SlideFeatures(
        slide_id="toy",
        patch_features=rng.normal(size=(n, 6)).astype(np.float32),
        patch_coords=coords,
        patch_grid=grid,
        patch_region=np.zeros(n, np.int64),
        patch_pack=np.zeros(n, np.int64),
        patch_tissue=np.full(n, 0.8, np.float32),
        attrs={"mpp": mpp, "patch_size_level0": step,
               "slide_width": int(grid[:, 0].max() + 2) * int(step), "slide_height": int(grid[:, 1].max() + 2) * int(step)},
    )


def test_roi_geometry_and_viewer_format():
    rng = np.random.default_rng(4)
    grid = _tissue_grid(rng)
    sf = _features(grid, mpp=0.25, step=512.0, rng=rng)
    rois = grow_rois(sf, 3, seed=0)
    boxes = patch_boxes(sf)
    assert sorted(np.concatenate([r.patch_index for r in rois]).tolist()) == list(range(len(grid)))
    assert [r.id for r in rois] == [f"R{i}" for i in range(1, len(rois) + 1)]
    assert [r.n_patches for r in rois] == sorted((r.n_patches for r in rois), reverse=True)
    for r in rois:
        b = boxes[r.patch_index]
        assert r.bbox == (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
        # 512 level-0 px at 0.25 µm/px is a 128 µm patch: 0.016384 mm² each.
        assert r.area_mm2 == pytest.approx(r.n_patches * 0.128**2)
        assert r.tissue_area_mm2 == pytest.approx(0.8 * r.area_mm2, rel=1e-6)
        inside = (b[:, 0] <= r.centre[0]) & (r.centre[0] < b[:, 2]) & (b[:, 1] <= r.centre[1]) & (r.centre[1] < b[:, 3])
        assert inside.any(), "the centre must lie on one of the ROI's own patches"
        poly = np.array(r.polygon)
        assert np.allclose(poly[0], poly[-1])
        assert (poly.min(0) >= np.array(r.bbox[:2]) - 1e-6).all() and (poly.max(0) <= np.array(r.bbox[2:]) + 1e-6).all()
    parsed = parse_rois({"slide": "toy", "rois": [{**r.to_dict(), "label": "x"} for r in rois]}, "rois/toy.json")
    assert [p.id for p in parsed.rois] == [r.id for r in rois]


def test_window_specs_parse_and_size_by_mpp():
    assert WindowSpec.parse("20x:512") == WindowSpec("20x", 0.5, 512)
    assert WindowSpec.parse("10x:512").size_um == 512.0
    assert WindowSpec.parse("0.25um:1024") == WindowSpec("0.25um", 0.25, 1024)
    for bad in ("512", "15x:512", "20x:-3", "x:1"):
        with pytest.raises(WindowError):
            WindowSpec.parse(bad)
    spec = WindowSpec("20x", 0.5, 512)
    assert spec.level0_side(0.25) == 1024 and spec.level0_side(0.5) == 512 and spec.level0_side(1.0) == 256
    # Shifted inside the slide at the border, same size.
    assert window_box((10, 4000), spec, 0.25, (5000, 4096)) == (0, 4096 - 1024, 1024, 4096)
    with pytest.raises(WindowError, match="does not fit"):
        window_box((100, 100), spec, 0.25, (800, 4096))


def test_box_tissue_fraction_is_area_weighted():
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10]])
    tissue = np.array([1.0, 0.5])
    windows = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 20, 20]])
    assert np.allclose(box_tissue_fractions(windows, boxes, tissue), [1.0, 0.75, 0.375])


def test_windows_use_each_slides_own_mpp(tmp_path):
    """The same physical window spans twice the level-0 pixels on a 0.25 µm/px scan as on a 0.5 µm/px one."""
    slides = tmp_path / "slides"
    slides.mkdir()
    blob = (Blob(0.5, 0.5, 0.42, 0.42),)
    write_aperio_slide(slides / "fine.svs", 3072, 3072, mpp=0.25, blobs=blob)
    write_aperio_slide(slides / "coarse.svs", 2048, 2048, mpp=0.5, blobs=blob)
    config = PreprocessConfig(workers=0, batch_size=32, progress=False, pack_features=False, global_feature=False)
    assert preprocess(slides, tmp_path / "job", config).exit_code == 0
    store = FeatureStore(tmp_path / "job")
    expected = {"fine": {"10x": 2048, "20x": 1024}, "coarse": {"10x": 1024, "20x": 512}}
    for slide, sides in expected.items():
        sf = store.load(slide)
        rois = grow_rois(sf, 2, seed=0)
        windows, rejected = plan_windows(sf, rois, DEFAULT_WINDOWS, min_tissue=0.5)
        assert windows and not rejected
        for w in windows:
            x0, y0, x1, y1 = w.bbox
            assert x1 - x0 == y1 - y0 == sides[w.spec.name]
            assert w.tissue_fraction >= 0.5
            assert 0 <= x0 and x1 <= sf.attrs["slide_width"] and 0 <= y0 and y1 <= sf.attrs["slide_height"]
        # Patch areas are physical too: 128 µm patches on both scans.
        assert sum(r.area_mm2 for r in rois) == pytest.approx(sf.n_patches * 0.128**2)
