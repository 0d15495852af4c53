"""Tissue detection reads tiled TIFFs through tifffile only where that gives OpenSlide's pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slide_fixtures import tissue_image, write_aperio_slide
from slidevl.slide import reader as reader_module
from slidevl.slide.reader import TiffSlide, open_slide
from slidevl.slide.tiffreads import TiffFirst
from slidevl.slide.tissue import TissueParams, segment_slide


@pytest.fixture(scope="module")
def aperio(tmp_path_factory):
    return write_aperio_slide(tmp_path_factory.mktemp("slides") / "aperio.svs", 2048, 1536, mpp=0.5)


def test_tifffile_reads_equal_openslide_reads_and_give_the_same_tissue(aperio, monkeypatch):
    with open_slide(aperio) as slide:
        assert slide.backend == "openslide"
        with TiffFirst(slide) as reads:
            assert np.array_equal(reads.read_downsampled(16.0)[0], slide.read_downsampled(16.0)[0])
            for level in range(slide.level_count):
                # Unaligned to tiles, across tile edges and past the level's edge.
                for location, size in (((300, 200), (97, 61)), ((1000, 900), (600, 300)), ((1900, 1400), (300, 300))):
                    assert np.array_equal(reads.read_region(location, level, size), slide.read_region(location, level, size))
                    assert np.array_equal(np.asarray(reads.read_region_image(location, level, size)),
                                          slide.read_region(location, level, size))
            assert reads.tiff_levels == tuple(range(slide.level_count))
        fast, fast_overview = segment_slide(slide, 0.5, TissueParams())
        monkeypatch.setattr(TiffFirst, "_open_tiff", staticmethod(lambda slide: None))  # OpenSlide alone
        with TiffFirst(slide) as reads:
            reads.read_region((0, 0), 0, (8, 8))
            assert reads.tiff_levels == ()
        plain, plain_overview = segment_slide(slide, 0.5, TissueParams())
    assert np.array_equal(fast_overview, plain_overview)
    assert np.array_equal(fast.mask, plain.mask) and fast.mask.any()
    assert fast.attrs() == plain.attrs()


def test_levels_that_could_differ_are_read_by_openslide(tmp_path, monkeypatch):
    # 2000 x 1500: the 125 x 93 level's downsample is 16.06, not a whole number: OpenSlide reads it.
    path = write_aperio_slide(tmp_path / "odd.svs", image=tissue_image(2000, 1500))
    with open_slide(path) as slide, TiffFirst(slide) as reads:
        assert slide.level_downsamples[2] != round(slide.level_downsamples[2])
        for level in range(slide.level_count):
            assert np.array_equal(reads.read_region((640, 320), level, (90, 70)), slide.read_region((640, 320), level, (90, 70)))
        assert reads.tiff_levels == (0, 1)
    # A decoder that disagrees on the probe tile (simulated by one changed pixel): that level goes to OpenSlide.
    decode = TiffSlide._read_array

    def off_by_one(self, x, y, level, width, height):
        pixels = decode(self, x, y, level, width, height)
        if level == 1:
            pixels[0, 0, 0] ^= 1
        return pixels

    monkeypatch.setattr(TiffSlide, "_read_array", off_by_one)
    with open_slide(path) as slide, TiffFirst(slide) as reads:
        assert np.array_equal(reads.read_region((0, 0), 1, (40, 40)), slide.read_region((0, 0), 1, (40, 40)))
        reads.read_region((0, 0), 0, (40, 40))
        assert reads.tiff_levels == (0,)

    def no_codec(self, x, y, level, width, height):
        raise ValueError("no decoder for this compression")

    monkeypatch.setattr(TiffSlide, "_read_array", no_codec)  # tifffile cannot decode: OpenSlide reads all
    with open_slide(path) as slide, TiffFirst(slide) as reads:
        assert np.array_equal(reads.read_region((0, 0), 0, (40, 40)), slide.read_region((0, 0), 0, (40, 40)))
        assert reads.tiff_levels == ()


def test_plain_tiffs_and_openslide_refusals_read_as_before(tmp_path):
    from slide_fixtures import write_plain_tiff

    path = write_plain_tiff(tmp_path / "plain.tif", 600, 400)
    with open_slide(path) as slide, TiffFirst(slide) as reads:
        assert slide.backend == "tifffile"
        assert np.array_equal(reads.read_region((10, 20), 0, (50, 40)), slide.read_region((10, 20), 0, (50, 40)))
        assert reads.tiff_levels == ()  # already tifffile: nothing to check, nothing opened twice


def test_tile_cache_is_bounded_and_safe_on_threads(aperio, monkeypatch):
    boxes = [((x, y), (200, 90)) for y in range(0, 1500, 70) for x in range(0, 2000, 180)]
    with TiffSlide(aperio) as fresh:
        want = [fresh.read_region(loc, 0, size) for loc, size in boxes]
    monkeypatch.setattr(reader_module, "_TILE_CACHE_BYTES", 6 * 256 * 256 * 3)  # six tiles
    with TiffSlide(aperio) as slide, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda box: slide.read_region(box[0], 0, box[1]), boxes))
        assert len(slide._tiles) <= 6 and slide._tile_bytes <= 6 * 256 * 256 * 3
        assert not slide._decoding
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
