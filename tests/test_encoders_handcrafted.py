"""The embedded ``handcrafted`` encoder: correctness of its parts and signal on H&E-like tiles."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

from slidevl.features.encoders import EncoderError, HandcraftedConfig, HandcraftedEncoder, get_encoder
from slidevl.features.encoders.downsample import block_sum
from slidevl.features.encoders.masked import masked_moments, masked_percentiles
from slidevl.features.encoders.nuclei import local_maxima
from slidevl.features.encoders.stain import optical_density, stain_density
from slidevl.features.encoders.synthetic import TILE_CLASSES, synthetic_tiles
from slidevl.features.encoders.texture import (
    GLCM_PROPERTIES,
    code_histogram,
    glcm_counts,
    glcm_offsets,
    glcm_properties,
    uniform_lbp,
)

ANGLES = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]


@pytest.fixture(scope="module")
def encoder() -> HandcraftedEncoder:
    return get_encoder("handcrafted")


@pytest.fixture(scope="module")
def class_tiles() -> dict[str, np.ndarray]:
    return {kind: synthetic_tiles(kind, 16, 256, seed=10 + i) for i, kind in enumerate(TILE_CLASSES)}


def _grey_images(rng: np.random.Generator) -> np.ndarray:
    """Random, few-level (many ties), flat and synthetic-tile grey images."""
    noisy = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)
    levels = (rng.integers(0, 4, (3, 40, 40)) * 60).astype(np.uint8)
    flat = np.full((2, 40, 40), 255, dtype=np.uint8)
    tile = synthetic_tiles("tumour", 2, 40, seed=3).mean(axis=-1).astype(np.uint8)
    return np.concatenate([noisy, levels, flat, tile])


def test_glcm_equals_skimage() -> None:
    images = _grey_images(np.random.default_rng(0)) // 16
    distances = [1, 3]
    offsets = glcm_offsets(distances, ANGLES)
    counts = glcm_counts(images, 16, offsets)
    props = glcm_properties(counts)
    for b, img in enumerate(images):
        ref = graycomatrix(img, distances, ANGLES, levels=16, symmetric=True)
        np.testing.assert_array_equal(counts[b], ref.transpose(2, 3, 0, 1).reshape(len(offsets), 16, 16))
        for name in GLCM_PROPERTIES:
            np.testing.assert_allclose(props[name][b], graycoprops(ref, name).reshape(-1), atol=1e-10, err_msg=name)


def test_glcm_rejects_out_of_range_levels() -> None:
    with pytest.raises(ValueError, match="levels"):
        glcm_counts(np.full((1, 4, 4), 9, np.uint8), 8, [(0, 1)])


@pytest.mark.parametrize("radius", [1, 2])
def test_uniform_lbp_equals_skimage(radius: int) -> None:
    images = _grey_images(np.random.default_rng(1))
    codes = uniform_lbp(images, 8, radius)
    ref = np.stack([local_binary_pattern(img, 8, radius, method="uniform")[radius:-radius, radius:-radius] for img in images])
    assert codes.shape == ref.shape
    ties = np.zeros(len(images), bool)
    ties[3:6] = True  # the few-level images, full of exactly balanced neighbourhoods
    np.testing.assert_array_equal(codes[~ties], ref[~ties])
    # There, float rounding of exact ties may resolve a few codes differently.
    assert (codes[ties] == ref[ties]).mean() >= 0.99
    hist = code_histogram(codes, 10)
    ref_hist = np.stack([np.bincount(r.astype(int).ravel(), minlength=10) / r.size for r in ref])
    np.testing.assert_allclose(hist, ref_hist, atol=5e-3)
    # Flat images are all-uniform with every neighbour ">= centre" (code 8), as in skimage.
    assert (codes[6:8] == 8).all()


def test_stain_density_is_six_times_rgb2hed() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(1, 256, (2, 3, 16, 16), dtype=np.uint8)  # planar; >= 1 avoids the different black clip
    ours = stain_density(optical_density(rgb))
    for b in range(2):
        ref = rgb2hed(rgb[b].transpose(1, 2, 0)).transpose(2, 0, 1)
        np.testing.assert_allclose(ours[b], 6 * ref, rtol=1e-4, atol=1e-5)


def test_block_sum_is_block_mean_for_every_size() -> None:
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    sums, n = block_sum(tiles, 64)
    assert (sums.shape, n) == ((2, 3, 64, 64), 16)
    expected = tiles.reshape(2, 64, 4, 64, 4, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(sums / n, expected, rtol=0, atol=1e-9)
    odd, n_odd = block_sum(tiles[:, :200, :200], 64)  # not a multiple: area resize
    assert (odd.shape, n_odd) == ((2, 3, 64, 64), 1)
    assert abs(float(odd.mean()) - float(tiles[:, :200, :200].mean())) < 1.0


def test_masked_statistics_match_numpy() -> None:
    rng = np.random.default_rng(4)
    values = rng.random((3, 2, 500)).astype(np.float32)
    mask = rng.random((3, 500)) > 0.4
    mask[2] = False
    mean, std = masked_moments(values, mask)
    pct = masked_percentiles(values, mask, (10, 50, 90))
    for b in range(2):
        for k in range(2):
            sel = values[b, k][mask[b]]
            assert mean[b, k] == pytest.approx(sel.mean(), rel=1e-5)
            assert std[b, k] == pytest.approx(sel.std(), rel=1e-4)
            np.testing.assert_allclose(pct[b, k], np.percentile(sel, [10, 50, 90]), rtol=1e-6)
    assert (mean[2] == 0).all() and (pct[2] == 0).all()


def test_local_maxima_count_separated_discs_once() -> None:
    img = np.zeros((1, 32, 32), np.float32)
    for y, x in ((5, 5), (5, 20), (20, 12), (27, 27)):
        img[0, y - 1 : y + 2, x - 1 : x + 2] = 1.0  # flat-topped 3x3 plateaus
    assert local_maxima(img, 0.5).sum() == 4
    assert local_maxima(img, 1.5).sum() == 0


def test_feature_names_and_shape(encoder: HandcraftedEncoder, class_tiles: dict[str, np.ndarray]) -> None:
    feats = encoder.encode_tiles(class_tiles["tumour"])
    assert feats.shape == (16, encoder.feature_dim) and feats.dtype == np.float32
    assert 64 <= encoder.feature_dim <= 128
    assert len(set(encoder.feature_names)) == encoder.feature_dim
    for name in ("tissue_fraction", "h_mean", "e_p90", "blob_count", "glcm_grey_contrast_d1", "lbp_64px_9", "hue_x"):
        assert name in encoder.feature_names
    assert np.isfinite(feats).all()
    json.dumps(encoder.provenance())


def test_features_are_per_tile_and_deterministic(encoder: HandcraftedEncoder, class_tiles: dict[str, np.ndarray]) -> None:
    batch = np.concatenate([class_tiles["tumour"][:3], class_tiles["background"][:2]])
    together = encoder.encode_tiles(batch)
    alone = np.concatenate([encoder.encode_tiles(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(together, encoder.encode_tiles(batch))


def test_features_follow_tissue_content(encoder: HandcraftedEncoder, class_tiles: dict[str, np.ndarray]) -> None:
    idx = {n: i for i, n in enumerate(encoder.feature_names)}
    means = {k: encoder.encode_tiles(t).mean(axis=0) for k, t in class_tiles.items()}
    tumour, stroma, background = means["tumour"], means["stroma"], means["background"]
    assert tumour[idx["tissue_fraction"]] > 0.9 and background[idx["tissue_fraction"]] < 0.1
    assert tumour[idx["blob_count"]] > 20 > stroma[idx["blob_count"]]
    assert tumour[idx["h_mean"]] > 2 * stroma[idx["h_mean"]]
    assert stroma[idx["e_mean"]] > 5 * background[idx["e_mean"]]
    # Oriented fibres: contrast depends strongly on direction.
    assert stroma[idx["glcm_grey_contrast_anisotropy_d1"]] > tumour[idx["glcm_grey_contrast_anisotropy_d1"]]


def test_nearest_centroid_separates_tissue_classes(encoder: HandcraftedEncoder, class_tiles: dict[str, np.ndarray]) -> None:
    feats = np.concatenate([encoder.encode_tiles(t) for t in class_tiles.values()])
    labels = np.repeat(np.arange(len(class_tiles)), 16)
    train = np.arange(len(labels)) % 2 == 0
    mu, sd = feats[train].mean(axis=0), feats[train].std(axis=0) + 1e-6
    z = (feats - mu) / sd
    centroids = np.stack([z[train & (labels == c)].mean(axis=0) for c in range(len(class_tiles))])
    pred = ((z[~train, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (pred == labels[~train]).mean() >= 0.95


def test_any_tile_size_is_accepted(encoder: HandcraftedEncoder) -> None:
    for size in (224, 512, 64):
        feats = encoder.encode_tiles(synthetic_tiles("tumour", 2, size, seed=size))
        assert feats.shape == (2, encoder.feature_dim) and np.isfinite(feats).all()


def test_bad_input_is_rejected(encoder: HandcraftedEncoder) -> None:
    with pytest.raises(EncoderError, match="uint8"):
        encoder.encode_tiles(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(EncoderError, match=r"\(B, H, W, 3\)"):
        encoder.encode_tiles(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(EncoderError, match="worker_transform"):
        encoder.encode(np.zeros((2, 5), np.float32))
    with pytest.raises(EncoderError, match="analysis_size"):
        HandcraftedEncoder(HandcraftedConfig(analysis_size=7))
    with pytest.raises(EncoderError, match="glcm_levels"):
        HandcraftedConfig(glcm_levels=300)


def test_revision_tracks_parameters_and_pickles(encoder: HandcraftedEncoder) -> None:
    other = HandcraftedEncoder(HandcraftedConfig(glcm_levels=8))
    assert other.revision != encoder.revision and other.name == encoder.name == "handcrafted"
    copy = pickle.loads(pickle.dumps(encoder))
    tiles = synthetic_tiles("stroma", 2, 256, seed=1)
    np.testing.assert_array_equal(copy.encode(copy.worker_transform(tiles)), encoder.encode_tiles(tiles))
