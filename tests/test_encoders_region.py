"""Region encoders over the 16 x 16 patch-feature grid of each 4096 px region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slidevl.features.encoders import EncoderError, available_region_encoders, get_region_encoder
from slidevl.features.encoders.region import REGION_ENCODERS

pytestmark = pytest.mark.filterwarnings("ignore")

D = 8


@pytest.fixture(scope="module")
def grid() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((6, 16, 16, D)).astype(np.float32)
    present = rng.random((6, 16, 16)) > 0.4
    present[4] = False  # a region with no patch
    present[5] = True  # a full region
    return feats, present


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("region-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=1, num_channels=D,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_mean_is_the_masked_mean(grid: tuple[np.ndarray, np.ndarray]) -> None:
    feats, present = grid
    enc = get_region_encoder()
    assert enc.name == "mean" and enc.output_dim(D) == D
    out = enc.encode(feats, present)
    assert out.shape == (6, D) and out.dtype == np.float32
    for r in range(6):
        expected = feats[r][present[r]].mean(axis=0) if present[r].any() else np.zeros(D)
        np.testing.assert_allclose(out[r], expected, rtol=1e-5, atol=1e-6)


def test_meanmax_concatenates_masked_mean_and_max(grid: tuple[np.ndarray, np.ndarray]) -> None:
    feats, present = grid
    enc = get_region_encoder("meanmax")
    assert enc.output_dim(D) == 2 * D
    out = enc.encode(feats, present)
    np.testing.assert_allclose(out[:, :D], get_region_encoder("mean").encode(feats, present))
    np.testing.assert_allclose(out[0, D:], feats[0][present[0]].max(axis=0))
    assert (out[4] == 0).all()
    # Absent patches never count, however large.
    spiked = feats.copy()
    spiked[~present] = 1e6
    np.testing.assert_array_equal(enc.encode(spiked, present), out)


def test_vit_region_encoder_is_the_cls_output_with_absent_patches_masked(vit_dir: Path, grid: tuple[np.ndarray, np.ndarray]) -> None:
    from transformers import ViTModel

    feats, present = grid
    enc = get_region_encoder(f"vit:{vit_dir}")
    assert enc.output_dim(D) == 32 and enc.name == f"vit-{vit_dir.name}"
    out = enc.encode(feats, present)
    assert out.shape == (6, 32) and np.isfinite(out).all()

    model = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False, local_files_only=True).eval()
    x = torch.from_numpy(feats * present[..., None]).permute(0, 3, 1, 2)
    mask = torch.cat([torch.ones(6, 1, dtype=torch.long), torch.from_numpy(present).flatten(1).long()], dim=1)
    with torch.no_grad():
        expected = model(pixel_values=x, attention_mask=mask).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    spiked = feats.copy()
    spiked[~present] = 50.0
    np.testing.assert_allclose(enc.encode(spiked, present), out, rtol=1e-5, atol=1e-6)
    # Presence itself matters: the same features with one more patch give another region feature.
    more = present.copy()
    more[0, 0, 0] = not more[0, 0, 0]
    assert not np.allclose(enc.encode(feats, more)[0], out[0])
    json.dumps(enc.provenance())


def test_vit_region_encoder_checks_dimensions(vit_dir: Path, grid: tuple[np.ndarray, np.ndarray]) -> None:
    feats, present = grid
    enc = get_region_encoder(f"vit:{vit_dir}")
    with pytest.raises(EncoderError, match="expects 8-d patch features, got 4-d"):
        enc.encode(feats[..., :4], present)
    with pytest.raises(EncoderError, match="16x16 patch grid"):
        enc.encode(feats[:, :8, :8], present[:, :8, :8])


def test_region_specs_and_inputs_are_validated(tmp_path: Path, grid: tuple[np.ndarray, np.ndarray]) -> None:
    from transformers import ViTConfig, ViTModel

    feats, present = grid
    with pytest.raises(EncoderError, match="unknown region encoder 'max'"):
        get_region_encoder("max")
    with pytest.raises(EncoderError, match="does not exist.*patch_size=1"):
        get_region_encoder(f"vit:{tmp_path / 'missing'}")
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=16)).save_pretrained(tmp_path)
    with pytest.raises(EncoderError, match="patch_size=16"):
        get_region_encoder(f"vit:{tmp_path}")
    with pytest.raises(EncoderError, match="present mask"):
        get_region_encoder("mean").encode(feats, present[:, :8])
    with pytest.raises(EncoderError, match=r"\(R, G, G, D\)"):
        get_region_encoder("mean").encode(feats[0], present[0])
    assert available_region_encoders()[:2] == ["mean", "meanmax"]


@pytest.mark.parametrize("kind", REGION_ENCODERS.names())
def test_every_registered_region_kind_keeps_the_contract(kind: str, vit_dir: Path, grid: tuple[np.ndarray, np.ndarray]) -> None:
    """A new region kind fails here until it gets a spec below: shape, dtype, absent patches ignored, deterministic."""
    specs = {"mean": "mean", "meanmax": "meanmax", "vit": f"vit:{vit_dir}"}
    assert kind in specs, f"add a spec for the region encoder kind {kind!r} to this test"
    feats, present = grid
    encoder = get_region_encoder(specs[kind])
    out = encoder.encode(feats, present)
    assert out.shape == (len(feats), encoder.output_dim(D)) and out.dtype == np.float32 and np.isfinite(out).all()
    scrambled = np.where(present[..., None], feats, 99.0).astype(np.float32)
    np.testing.assert_allclose(encoder.encode(scrambled, present), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(get_region_encoder(specs[kind]).encode(feats, present), out)
    assert not np.allclose(out[0], out[1]), "region features depend on the region's patches"
    assert encoder.provenance()["name"] == encoder.name
