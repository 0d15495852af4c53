"""Tissue segmentation, exact patch tissue fractions, GeoJSON export and the QC picture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slide_fixtures import Blob, blob_mask, tissue_image, write_aperio_slide
from slidevl.slide.geojson import mask_polygons, tissue_geojson
from slidevl.slide.qc import render_qc
from slidevl.slide.reader import open_slide
from slidevl.slide.tissue import TissueMask, TissueParams, segment_image, segment_slide
from slidevl.slide.membranes import saturation as tissue_saturation
from slidevl.tiling.grid import GridSpec, SlideGrid


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_segmentation_finds_the_blobs(tmp_path):
    path = write_aperio_slide(tmp_path / "s.svs", 2048, 1536, mpp=0.5)
    with open_slide(path) as slide:
        tissue, overview = segment_slide(slide, 0.5, TissueParams(downsample=8))
    assert overview.shape == (192, 256, 3) and tissue.mask.shape == (192, 256)
    assert tissue.scale_x == pytest.approx(8.0) and tissue.level == 1
    assert _iou(tissue.mask, blob_mask(256, 192)) > 0.9


def test_blank_glass_stays_empty():
    blank = tissue_image(400, 300, blobs=())
    tissue = segment_image(blank, 8.0, TissueParams())
    assert not tissue.mask.any()
    assert tissue.threshold >= TissueParams().min_saturation


def test_saturation_threshold_override():
    img = tissue_image(400, 300)
    assert not segment_image(img, 8.0, TissueParams(saturation_threshold=250)).mask.any()
    assert segment_image(img, 8.0, TissueParams(saturation_threshold=30)).mask.any()


def test_small_objects_removed_and_small_holes_filled():
    img = np.full((200, 200, 3), 245, np.uint8)
    img[20:120, 20:120] = (200, 100, 160)  # 100x100 px tissue
    img[60:66, 60:66] = 245  # 6x6 hole (36 px)
    img[150:154, 150:154] = (200, 100, 160)  # 4x4 speck (16 px)
    params = TissueParams(median_size=0, closing_radius_um=0, min_object_area_um2=20 * 64.0, max_hole_area_um2=40 * 64.0)
    tissue = segment_image(img, 8.0, params)  # 8 µm/px: 64 µm² per pixel
    assert tissue.mask[60:66, 60:66].all()  # hole (36 px <= 40) filled
    assert not tissue.mask[150:154, 150:154].any()  # speck (16 px < 20) removed
    keep = segment_image(img, 8.0, TissueParams(median_size=0, closing_radius_um=0, min_object_area_um2=0, max_hole_area_um2=0))
    assert not keep.mask[60:66, 60:66].any() and keep.mask[150:154, 150:154].all()


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.2527])
def test_patch_fractions_are_exact_area_coverage(mpp):
    # Mask pixels are 7.3 level-0 px; coverage computed by brute force at level 0.
    mask = np.zeros((60, 80), bool)
    mask[10:37, 13:55] = True
    mask[40:52, 5:9] = True
    tissue = TissueMask(mask=mask, scale_x=7.3, scale_y=7.3, threshold=0, level=0, params=TissueParams())
    grid = SlideGrid(GridSpec(target_mpp=0.5, patch_px=32), width=584, height=438, mpp=mpp)
    fractions = tissue.patch_fractions(grid)
    assert fractions.shape == (grid.n_rows, grid.n_cols)
    ys, xs = np.mgrid[0:438, 0:584]
    fine = mask[np.minimum((ys + 0.5) / 7.3, 59).astype(int), np.minimum((xs + 0.5) / 7.3, 79).astype(int)]
    for col, row in grid.all_patches()[::7]:
        x0, y0, x1, y1 = grid.patch_boxes(np.array([[col, row]]))[0]
        assert fractions[row, col] == pytest.approx(fine[y0:y1, x0:x1].mean(), abs=0.03)


@pytest.mark.parametrize("scale", [16.0, 10.0])
def test_patch_fractions_match_a_dense_count_exactly(scale):
    """Against counting pixels on a finer copy of the mask on which every patch edge is whole:
    16 mask px to a 256 px patch, or 25.6 (5 finer pixels to a mask pixel, 128 to a patch)."""
    rng = np.random.default_rng(1)
    mask = rng.random((83, 121)) < 0.6
    mask[20:60, 30:90] = True
    mask[:, 100:] = False
    grid = SlideGrid(GridSpec(target_mpp=0.5, patch_px=256), width=int(121 * scale) + 37, height=int(83 * scale) + 600, mpp=0.5)
    tissue = TissueMask(mask=mask, scale_x=scale, scale_y=scale, threshold=0, level=0, params=TissueParams())
    fractions = tissue.patch_fractions(grid)
    k = 1 if scale == 16.0 else 5  # finer pixels per mask pixel
    per_patch = int(256 / scale * k)
    fine = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
    rows, cols = grid.n_rows * per_patch, grid.n_cols * per_patch
    padded = np.zeros((max(rows, fine.shape[0]), max(cols, fine.shape[1])), bool)  # past the mask: no tissue
    padded[: fine.shape[0], : fine.shape[1]] = fine
    want = padded[:rows, :cols].reshape(grid.n_rows, per_patch, grid.n_cols, per_patch).mean(axis=(1, 3))
    np.testing.assert_allclose(fractions, want, rtol=0, atol=1e-6)
    assert ((fractions > 0) == (want > 0)).all() and ((fractions >= 0.25) == (want >= 0.25)).all()


def _ring_area(ring) -> float:
    r = np.asarray(ring)
    return 0.5 * float(np.dot(r[:-1, 0], r[1:, 1]) - np.dot(r[1:, 0], r[:-1, 1]))


def test_geojson_is_qupath_shaped():
    img = np.full((120, 160, 3), 245, np.uint8)
    img[10:90, 10:90] = (200, 100, 160)
    img[30:60, 30:60] = 245  # a large hole that is kept
    img[20:60, 110:150] = (200, 100, 160)
    params = TissueParams(median_size=0, closing_radius_um=0, min_object_area_um2=0, max_hole_area_um2=10)
    tissue = segment_image(img, 1.0, params, scale=(4.0, 4.0))
    gj = json.loads(json.dumps(tissue_geojson(tissue, "slide")))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    areas = []
    for feature in gj["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tissue"
        rings = feature["geometry"]["coordinates"]
        for ring in rings:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            xs, ys = np.asarray(ring).T
            assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= 640 and ys.max() <= 480
        assert _ring_area(rings[0]) > 0 and all(_ring_area(h) < 0 for h in rings[1:])
        areas.append(sum(_ring_area(r) for r in rings))
    # Level-0 areas: (80*80 - 30*30) and 40*40 mask px of 16 level-0 px², within outline slack.
    assert sorted(areas) == pytest.approx(sorted([(80 * 80 - 30 * 30) * 16, 40 * 40 * 16]), rel=0.06)
    assert len(gj["features"][0]["geometry"]["coordinates"]) + len(gj["features"][1]["geometry"]["coordinates"]) == 3
    assert tissue_geojson(tissue, "slide") == tissue_geojson(tissue, "slide")  # deterministic ids


def test_qc_picture_highlights_kept_patches():
    img = tissue_image(512, 384, blobs=(Blob(0.5, 0.5, 0.3, 0.3),))
    tissue = segment_image(img, 4.0, TissueParams(), scale=(8.0, 8.0))
    grid = SlideGrid(GridSpec(), width=4096, height=3072, mpp=0.5)
    kept = np.array([[5, 5], [6, 5]])
    picture = np.asarray(render_qc(img, grid, kept, mask_polygons(tissue), max_side=512))
    assert picture.shape == (384, 512, 3)
    x0, y0, x1, y1 = (grid.patch_boxes(kept[:1])[0] / 8).astype(int)
    inside = picture[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3].astype(int)
    original = img[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3].astype(int)
    assert (inside[..., 2] - original[..., 2]).mean() > 5  # tinted blue
    far = grid.patch_boxes(np.array([[1, 10]]))[0] // 8
    assert np.abs(picture[far[1] + 3 : far[3] - 3, far[0] + 3 : far[2] - 3].astype(int)
                  - img[far[1] + 3 : far[3] - 3, far[0] + 3 : far[2] - 3].astype(int)).max() == 0


def _membrane_net(img: np.ndarray, box: tuple[float, float, float, float], spacing: int, rng) -> np.ndarray:
    """Draw 1-px pink cell walls ``spacing`` px apart in the relative ``box``; returns the box's mask."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    for x in range(x0, x1, spacing):
        xx = min(x1 - 1, x + int(rng.integers(-8, 9)))
        img[y0:y1, xx] = (228, 160, 200)
    for y in range(y0, y1, spacing):
        yy = min(y1 - 1, y + int(rng.integers(-8, 9)))
        img[yy, x0:x1] = (228, 160, 200)
    truth = np.zeros((h, w), dtype=bool)
    truth[y0:y1, x0:x1] = True
    return truth


def test_adipose_recovery_adds_membrane_networks_that_touch_tissue(tmp_path):
    """Fat next to a tissue piece vanishes in the overview; its membranes at 1 µm/px bring it back.

    A second membrane network away from the tissue and sparse pink specks (debris more
    than the closing's diameter apart) on the noisy glass stay out: closing fills only
    gaps between lines, and only networks touching tissue count.
    """
    from scipy import ndimage

    rng = np.random.default_rng(3)
    blob = Blob(0.3, 0.4, 0.2, 0.25)
    img = tissue_image(2048, 1536, blobs=(blob,))
    fat = _membrane_net(img, (0.48, 0.1, 0.95, 0.55), 140, rng)  # 70 µm cells at 0.5 µm/px
    apart = _membrane_net(img, (0.55, 0.75, 0.95, 0.95), 140, rng)
    for y in range(1060, 1500, 260):
        for x in range(60, 1000, 260):
            img[y : y + 3, x : x + 3] = (228, 160, 200)
    path = write_aperio_slide(tmp_path / "fat.svs", image=img, mpp=0.5)

    def overview(truth: np.ndarray) -> np.ndarray:
        return truth.reshape(96, 16, 128, 16).mean(axis=(1, 3)) > 0.5

    with open_slide(path) as slide:
        plain, _ = segment_slide(slide, 0.5, TissueParams(adipose_radius_um=0))
        tissue, _ = segment_slide(slide, 0.5, TissueParams())
    assert tissue.mask.shape == (96, 128) and tissue.line_threshold is not None
    tissue_truth = overview(blob_mask(2048, 1536, (blob,)))
    fat_only = overview(fat) & ~tissue_truth
    assert plain.mask[fat_only].mean() < 0.2
    assert tissue.mask[fat_only].mean() > 0.9
    assert tissue.mask[tissue_truth].mean() > 0.95
    assert tissue.mask[overview(apart)].mean() < 0.05
    glass = ~ndimage.binary_dilation(tissue_truth | overview(fat) | overview(apart), iterations=2)
    assert tissue.mask[glass].mean() < 0.01
    assert plain.attrs()["adipose_threshold_used"] is None


def test_membrane_map_is_the_block_maximum(tmp_path):
    from slidevl.slide.membranes import MembraneMap, slide_block_reader

    path = write_aperio_slide(tmp_path / "s.svs", 512, 384, mpp=0.5)
    with open_slide(path) as slide:
        full = tissue_saturation(np.asarray(slide.read_region_image((0, 0), 0, (512, 384))))
        # Blocks of 7 do not divide the 37 x 50 overview, nor does the overview divide the level.
        every = MembraneMap((37, 50), 7, 0, 1.0, slide_block_reader(slide, 0, (37, 50)))
        assert every.read(np.ones(every.done.shape, dtype=bool)) == every.done.size
        some = MembraneMap((37, 50), 7, 0, 1.0, slide_block_reader(slide, 0, (37, 50)))
        wanted = np.zeros(some.done.shape, dtype=bool)
        wanted[0, 5:7] = wanted[1, 6] = True
        assert some.read(wanted) == 3 and some.read(wanted) == 0  # each block once
        with pytest.raises(ValueError, match="coarser than"):
            slide_block_reader(slide, 1, (384, 512))
    rows = np.floor(np.arange(38) * 384 / 37).astype(int)
    cols = np.floor(np.arange(51) * 512 / 50).astype(int)
    rows[-1], cols[-1] = 384, 512
    want = np.array([[full[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].max() for j in range(50)] for i in range(37)])
    np.testing.assert_array_equal(every.values, want)
    read = np.repeat(np.repeat(wanted, 7, axis=0), 7, axis=1)[:37, :50]
    np.testing.assert_array_equal(some.values, np.where(read, want, 0))


def test_closing_matches_scipy_with_a_disk():
    from scipy import ndimage
    from skimage.morphology import disk

    from slidevl.slide.adipose import closed

    rng = np.random.default_rng(0)
    for radius in (1, 2, 6, 9):
        mask = rng.random((71, 93)) < 0.08
        mask[20:40, 10:50] = True
        pad = radius + 1
        want = ndimage.binary_closing(np.pad(mask, pad), structure=disk(radius).astype(bool))[pad:-pad, pad:-pad]
        np.testing.assert_array_equal(closed(mask, radius), want)


def _fat_slide(tmp_path):
    """Tissue, fat with thin pale 0.5 µm membranes beside it, and a membrane net apart from both."""
    rng = np.random.default_rng(5)
    blob = Blob(0.27, 0.5, 0.25, 0.38)
    img = tissue_image(2048, 1536, blobs=(blob,))
    fat = _membrane_net(img, (0.48, 0.1, 0.95, 0.55), 140, rng)
    apart = _membrane_net(img, (0.75, 0.88, 0.98, 0.98), 140, rng)
    return write_aperio_slide(tmp_path / "fat.svs", image=img, mpp=0.5), blob, fat, apart


def test_adipose_recovery_reads_only_where_it_matters(tmp_path):
    """Membranes are read only where the overview shows fat chained to the tissue, coarse level
    first and the fine one where the coarse one is in doubt, and that gives the mask reading
    both levels everywhere gives, but for the tissue's pale edge."""
    from scipy import ndimage

    from slidevl.slide.adipose import GLASS_SAMPLE
    from slidevl.slide.membranes import MembraneMap, slide_block_reader
    from slidevl.slide.tissue import FINE_BLOCK, MEMBRANE_BLOCK, membrane_levels

    path, blob, fat, apart = _fat_slide(tmp_path)
    with open_slide(path) as slide:
        params = TissueParams()
        zoned, overview = segment_slide(slide, 0.5, params)
        assert zoned.adipose_levels == (1, 0) == tuple(membrane_levels(slide, 0.5, params, 2))
        shape = overview.shape[:2]
        everything = [MembraneMap(shape, MEMBRANE_BLOCK, lv, slide.level_downsamples[lv], slide_block_reader(slide, lv, shape))
                      for lv in (1, 0)]
        for level in everything:
            level.read(np.ones(level.done.shape, dtype=bool))
        full = segment_image(overview, 8.0, params, scale=(16.0, 16.0), level=2, membranes=everything)
    # Reading less never adds to the mask, and takes from it no more than the fat's outer edge,
    # whose last walls are too faint at the coarse level to be asked about.
    assert zoned.line_threshold == full.line_threshold
    assert not (zoned.mask & ~full.mask).any()
    assert (zoned.mask != full.mask).mean() < 0.01
    coarse_read, fine_read = zoned.adipose_read
    assert 0 < fine_read < coarse_read  # 0.5 µm walls: too thin for 2 µm pixels, so in doubt there
    # Which blocks: rebuild the read with maps that record it.
    with open_slide(path) as slide:
        maps = [MembraneMap(shape, block, lv, slide.level_downsamples[lv], slide_block_reader(slide, lv, shape))
                for block, lv in ((MEMBRANE_BLOCK, 1), (FINE_BLOCK, 0))]
        segment_image(overview, 8.0, params, scale=(16.0, 16.0), level=2, membranes=maps)
    assert (maps[0].done.mean(), maps[1].done.mean()) == pytest.approx((coarse_read, fine_read))
    # The fine level is read in smaller blocks: compare on the coarse level's blocks.
    coarse, fine = maps[0].done, maps[0].blocks_of(maps[1].pixels_of(maps[1].done))
    assert not (fine & ~coarse).any()  # the fine level only where the coarse one looked

    def blocks(truth: np.ndarray) -> np.ndarray:
        return truth.reshape(coarse.shape[0], 256, coarse.shape[1], 256).any(axis=(1, 3))

    core = blob_mask(128, 96, (blob,)).reshape(coarse.shape[0], 16, coarse.shape[1], 16).all(axis=(1, 3))
    assert core.any() and not (coarse & core).any()  # blocks of tissue alone: never read
    assert coarse[blocks(fat)].mean() >= 0.85  # the overview showed the fat
    fat_only = fat.reshape(96, 16, 128, 16).mean(axis=(1, 3)) > 0.5
    assert zoned.mask[fat_only].mean() > 0.9
    # Plain glass: only a sample to learn its level from, beyond the fat's blocks and their neighbours.
    around = ndimage.binary_dilation(blocks(fat), structure=np.ones((3, 3), dtype=bool))
    assert (coarse & ~around).sum() <= GLASS_SAMPLE
    assert not (coarse & blocks(apart) & ~around).any()  # the net apart from the tissue: not chained to it
    assert not fine[blocks(apart) & ~blocks(fat)].any()


def _planted_fat_slide(tmp_path):
    """A slide painted with the synthetic cohort's own textures (its ~1 µm fat walls, its stain,
    its pyramid) at 0.5 µm/px: a piece of tumour and stroma whose right third is fat, and a fat
    lobule 160 µm out from it. Returns the path and the tissue, fat and apart truth at 16x."""
    from slidevl.synth.classes import FAT, STROMA, TUMOUR
    from slidevl.synth.stain import apply_lut, default_stain, stain_lut
    from slidevl.synth.textures import texture_bank
    from slidevl.synth.tiff import write_slide_tiff

    height, width = 2048, 3584
    yy, xx = np.mgrid[0 : height // 16, 0 : width // 16]
    piece = ((xx - 96) / 80.0) ** 2 + ((yy - 64) / 52.0) ** 2 <= 1
    fat = piece & (xx >= 128)
    tissue = piece & ~fat
    apart = (xx >= 186) & (xx < 214) & (yy >= 40) & (yy < 90)  # 10 px = 160 µm from the piece
    kinds = np.where(fat | apart, FAT, np.where(tissue, np.where(xx < 70, TUMOUR, STROMA), 0))
    classes = kinds.repeat(16, axis=0).repeat(16, axis=1)
    h = np.zeros((height, width), np.uint8)
    e = np.zeros((height, width), np.uint8)
    for kind in (TUMOUR, STROMA, FAT):
        hk, ek = texture_bank(kind, 2 if kind == TUMOUR else 0, 0, 512).window(0, 0, height, width)
        np.copyto(h, hk, where=classes == kind)
        np.copyto(e, ek, where=classes == kind)
    rgb = apply_lut(h, e, stain_lut(default_stain()))
    path = tmp_path / "planted.tiff"
    write_slide_tiff(path, lambda y0, x0, hh, ww: rgb[y0 : y0 + hh, x0 : x0 + ww], width, height, layout="aperio")
    return path, tissue, fat, apart


def test_adipose_recovery_recovers_planted_fat(tmp_path):
    """The synthetic cohort's fat: the overview alone loses it, recovery brings back >= 90% of
    the fat against the tissue and none of the lobule apart, reading around the fat only, and
    mostly at the coarse level (its walls resolve at 2 µm/px; the fine one checks the fat's edge)."""
    from scipy import ndimage

    path, tissue, fat, apart = _planted_fat_slide(tmp_path)
    with open_slide(path) as slide:
        plain, _ = segment_slide(slide, 0.5, TissueParams(adipose_radius_um=0))
        found, _ = segment_slide(slide, 0.5, TissueParams())
    assert found.mask.shape == fat.shape
    assert plain.mask[tissue].mean() > 0.95 and plain.mask[fat].mean() < 0.2
    assert found.mask[fat].mean() >= 0.9
    assert found.mask[apart].mean() < 0.05
    glass = ~ndimage.binary_dilation(tissue | fat | apart, iterations=2)
    assert found.mask[glass].mean() < 0.005
    coarse_read, fine_read = found.adipose_read
    assert coarse_read < 0.5 and fine_read < coarse_read / 3


def test_adipose_reach_limits_how_far_fat_is_recovered(tmp_path):
    from scipy import ndimage

    rng = np.random.default_rng(5)
    img = tissue_image(2048, 1536, blobs=(Blob(0.3, 0.4, 0.2, 0.25),))
    _membrane_net(img, (0.48, 0.1, 0.95, 0.55), 140, rng)
    path = write_aperio_slide(tmp_path / "fat.svs", image=img, mpp=0.5)
    with open_slide(path) as slide:
        plain, _ = segment_slide(slide, 0.5, TissueParams(adipose_radius_um=0))
        near, _ = segment_slide(slide, 0.5, TissueParams(adipose_reach_um=160))  # 20 overview px
        far, _ = segment_slide(slide, 0.5, TissueParams())
    distance = ndimage.distance_transform_edt(~plain.mask)
    assert distance[near.mask].max() <= 20
    assert distance[far.mask].max() > 30


def test_saturation_matches_hsv():
    from skimage.color import rgb2hsv

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    want = np.floor(rgb2hsv(rgb)[..., 1] * 255 + 1e-6)
    np.testing.assert_allclose(tissue_saturation(rgb), want, atol=1)


def test_median_threshold_is_the_rank_median_thresholded():
    """The box-filter majority vote gives exactly ``rank.median(...) > t``, borders and even windows included."""
    from skimage.filters import rank

    from slidevl.slide.tissue import _median_above

    rng = np.random.default_rng(0)
    for shape, size in (((50, 70), 7), ((31, 20), 6), ((5, 3), 7), ((40, 40), 17), ((1, 9), 4), ((12, 12), 2)):
        values = rng.integers(0, 60, shape).astype(np.uint8)
        median = rank.median(values, footprint=np.ones((size, size), dtype=bool))
        for t in (0, 17, 29, 30, 59):
            np.testing.assert_array_equal(_median_above(values, size, t), median > t)
