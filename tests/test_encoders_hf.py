"""``hf:`` adapter on tiny transformers models built from configs and saved locally."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BitImageProcessor,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from slidevl.features.encoders import EncoderError, HFEncoder, get_encoder  # noqa: E402
from slidevl.features.encoders.synthetic import synthetic_tiles  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _vit_config(**overrides: int) -> ViTConfig:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def _tiny_resnet() -> ResNetModel:
    return ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.concatenate([synthetic_tiles("tumour", 3, 256, seed=0), synthetic_tiles("stroma", 2, 256, seed=1)])


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vit-tiny")
    torch.manual_seed(0)
    ViTModel(_vit_config()).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.6, 0.5, 0.7], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit(vit_dir: Path) -> HFEncoder:
    return get_encoder(f"hf:{vit_dir}")


def test_vit_features_are_the_pooled_model_output(vit: HFEncoder, vit_dir: Path, tiles: np.ndarray) -> None:
    assert (vit.name, vit.input_size, vit.feature_dim, vit.pooling) == ("hf-" + vit_dir.name, 32, 32, "pooler_output")
    x = vit.worker_transform(tiles)
    assert isinstance(x, torch.Tensor) and x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    feats = vit.encode(x)
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    model = ViTModel.from_pretrained(vit_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output.numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(vit.encode_tiles(tiles), feats)


def test_transform_matches_the_saved_image_processor(vit: HFEncoder, vit_dir: Path, tiles: np.ndarray) -> None:
    processor = transformers.AutoImageProcessor.from_pretrained(vit_dir, local_files_only=True)
    expected = processor(images=list(tiles), return_tensors="pt")["pixel_values"]
    ours = vit.worker_transform(tiles)
    # PIL and torch's uint8 resampling agree to one intensity level (1 / (0.2 * 255) here).
    assert (ours - expected).abs().max().item() < 0.021
    assert (ours - expected).abs().mean().item() < 1e-3


@pytest.mark.parametrize(
    "processor, size",
    [
        (BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True), 32),
        (ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.75), 48),
        (ViTImageProcessor(size={"height": 300, "width": 300}, resample=2), 300),
    ],
    ids=["dinov2-style-crop", "convnext-crop-pct", "vit-upsample-bilinear"],
)
def test_processor_geometries(tmp_path: Path, tiles: np.ndarray, processor: object, size: int) -> None:
    _tiny_resnet().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    enc = get_encoder(f"hf:{tmp_path}")
    assert enc.input_size == size
    expected = transformers.AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)(
        images=list(tiles[:2]), return_tensors="pt"
    )["pixel_values"]
    ours = enc.worker_transform(tiles[:2])
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean().item() < 2e-3


def test_resnet_without_processor_uses_imagenet_defaults(tmp_path: Path, tiles: np.ndarray) -> None:
    torch.manual_seed(1)
    model = _tiny_resnet().eval()
    model.save_pretrained(tmp_path)
    enc = get_encoder(f"hf:{tmp_path}")
    assert enc.input_size == 224 and enc.pooling == "pooler_output" and enc.feature_dim == 16
    assert enc.transform.mean == (0.485, 0.456, 0.406)
    x = enc.worker_transform(tiles[:2])
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output.flatten(1).numpy()
    np.testing.assert_allclose(enc.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_untrained_pooler_falls_back_to_cls_token(tmp_path: Path, tiles: np.ndarray) -> None:
    torch.manual_seed(2)
    model = ViTModel(_vit_config(), add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)  # no pooler weights: AutoModel would initialise one randomly
    enc = get_encoder(f"hf:{tmp_path}")
    assert enc.pooling == "cls_token"
    x = enc.worker_transform(tiles[:2])
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(enc.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_worker_copy_has_no_model(vit: HFEncoder, tiles: np.ndarray) -> None:
    blob = pickle.dumps(vit)
    assert len(blob) < 10_000  # no weights travel to the workers
    copy = pickle.loads(blob)
    assert torch.equal(copy.worker_transform(tiles), vit.worker_transform(tiles))
    with pytest.raises(EncoderError, match="worker copy"):
        copy.encode(copy.worker_transform(tiles))
    assert vit.model is not None


def test_provenance_and_revision(vit: HFEncoder, vit_dir: Path, tmp_path: Path) -> None:
    prov = vit.provenance()
    json.dumps(prov)
    assert prov["source"] == str(vit_dir.resolve()) and prov["architecture"] == "ViTModel"
    assert prov["transform"]["mean"] == pytest.approx([0.6, 0.5, 0.7])
    assert get_encoder(f"hf:{vit_dir}").revision == vit.revision
    ViTModel(_vit_config(num_hidden_layers=1)).save_pretrained(tmp_path)
    assert get_encoder(f"hf:{tmp_path}").revision != vit.revision


def test_missing_or_invalid_folders_fail_clearly(tmp_path: Path, vit_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(EncoderError, match=r"nope does not exist.*save_pretrained.*config\.json"):
        get_encoder(f"hf:{missing}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        get_encoder(f"hf:{empty}")
    (empty / "config.json").write_text((vit_dir / "config.json").read_text())
    with pytest.raises(EncoderError, match="holds no weights"):
        get_encoder(f"hf:{empty}")
    weights = vit_dir / "model.safetensors"
    with pytest.raises(EncoderError, match="is a file"):
        get_encoder(f"hf:{weights}")


def test_checkpoint_not_matching_its_config_is_refused(tmp_path: Path, vit_dir: Path) -> None:
    for name in ("model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((vit_dir / name).read_bytes())
    config = json.loads((vit_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3  # a third layer with no weights in the file
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError, match="lacks .* weights"):
        get_encoder(f"hf:{tmp_path}")
    config["num_hidden_layers"], config["hidden_size"] = 2, 48  # shapes differ from the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError, match="could not load a transformers model"):
        get_encoder(f"hf:{tmp_path}")


def test_text_model_is_not_a_tile_encoder(tmp_path: Path) -> None:
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(EncoderError, match="does not take pixel_values"):
        get_encoder(f"hf:{tmp_path}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_unavailable_device_fails_clearly(vit_dir: Path) -> None:
    with pytest.raises(EncoderError, match="CUDA is not available"):
        get_encoder(f"hf:{vit_dir}", device="cuda")
