"""Opening slides: OpenSlide for pyramids, tifffile for plain TIFF, clear errors otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from slide_fixtures import (
    tissue_image,
    write_aperio_slide,
    write_not_a_slide,
    write_plain_tiff,
    write_truncated_slide,
    write_zero_byte,
)
from slidevl.slide.reader import SlideOpenError, TiffSlide, open_slide


@pytest.fixture(scope="module")
def aperio(tmp_path_factory):
    return write_aperio_slide(tmp_path_factory.mktemp("slides") / "aperio.svs", 2048, 1536, mpp=0.25)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return write_plain_tiff(tmp_path_factory.mktemp("slides") / "plain.tif", 1000, 700, mpp=0.5)


def test_openslide_reads_aperio_pyramid(aperio):
    with open_slide(aperio) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2048, 1536)
        assert slide.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert slide.native_mpp() == (0.25, 0.25, "openslide.mpp-x")
        tile = slide.read_region((100, 200), 0, (64, 32))
        assert tile.shape == (32, 64, 3) and tile.dtype == np.uint8


def test_read_region_outside_slide_is_white(aperio):
    with open_slide(aperio) as slide:
        tile = slide.read_region((2040, 1530), 0, (32, 32))
    assert (tile[10:, 10:] == 255).all()  # beyond the right/bottom edge
    assert tile[:6, :8].max() < 255 or tile[:6, :8].min() < 255  # inside: real pixels


def test_best_level_is_highest_not_above_scale(aperio):
    with open_slide(aperio) as slide:
        assert slide.best_level(1.0) == 0
        assert slide.best_level(3.9) == 0
        assert slide.best_level(4.0) == 1
        assert slide.best_level(3.9999) == 1  # within the downsample tolerance
        assert slide.best_level(15.0) == 1
        assert slide.best_level(64.0) == 2


def test_read_box_uses_level_without_resizing_when_scale_matches(aperio):
    with open_slide(aperio) as slide:
        direct = slide.read_region((512, 256), 1, (64, 64))
        boxed = slide.read_box((512, 256, 768, 512), 64)  # 256 level-0 px -> 64 px: level 1 as-is
        assert np.array_equal(direct, boxed)
        resized = slide.read_box((512, 256, 812, 556), 64)  # scale 4.69: level 1, resized
        assert resized.shape == (64, 64, 3)


def test_tifffile_fallback_for_plain_tiff(plain):
    expected = tifffile.imread(plain)
    with open_slide(plain) as slide:
        assert slide.backend == "tifffile"
        assert slide.dimensions == (1000, 700)
        assert slide.native_mpp() == pytest.approx((0.5, 0.5, "tiff.XResolution"))
        # Across strip boundaries (64 rows per strip) and the image edge.
        region = slide.read_region((900, 60), 0, (150, 140))
    assert np.array_equal(region[:, :100], expected[60:200, 900:1000])
    assert (region[:, 100:] == 255).all()


def test_tifffile_reads_pyramid_levels_when_used_directly(aperio):
    with TiffSlide(aperio) as slide:
        assert slide.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert slide.native_mpp() == (0.25, 0.25, "aperio.MPP")
        with open_slide(aperio) as osr:
            a = slide.read_region((1024, 512), 1, (100, 80)).astype(int)
            b = osr.read_region((1024, 512), 1, (100, 80)).astype(int)
    assert np.abs(a - b).mean() < 2  # same JPEG tiles, possibly different decoders


def test_generic_tiled_tiff_opens_with_openslide(tmp_path):
    path = tmp_path / "generic.tif"
    tifffile.imwrite(path, tissue_image(512, 512), tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    with open_slide(path) as slide:
        assert (slide.backend, slide.vendor) == ("openslide", "generic-tiff")
        assert slide.native_mpp()[:2] == pytest.approx((0.5, 0.5))


def test_read_downsampled_matches_direct_resize(plain):
    full = tifffile.imread(plain)
    with open_slide(plain) as slide:
        small, level = slide.read_downsampled(10.0)
    assert level == 0 and small.shape == (70, 100, 3)
    ref = np.asarray(Image.fromarray(full).resize((100, 70), Image.Resampling.BOX)).astype(int)
    assert np.abs(small.astype(int) - ref).max() <= 2


@pytest.mark.parametrize(
    "writer, message",
    [
        (write_zero_byte, r"empty \(0 bytes\)"),
        (write_not_a_slide, "cannot open as a slide"),
        (write_truncated_slide, "truncated"),
    ],
)
def test_unreadable_files_raise_clear_errors(tmp_path, writer, message):
    path = writer(tmp_path / "bad.svs")
    with pytest.raises(SlideOpenError, match=message) as info:
        open_slide(path)
    assert str(path) in str(info.value)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideOpenError, match="directory"):
        open_slide(tmp_path)
