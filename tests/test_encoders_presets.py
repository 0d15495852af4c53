"""Named foundation-model presets: real architectures from their own libraries, loaded as shipped.

Every timm and transformers preset is built with random weights (depth reduced so the
suite stays fast), saved in the layout its hub repository ships, and loaded back
through ``NAME:PATH``. Its features must equal the library model's own forward on the
same tiles, read by OpenSlide and transformed as the model card transforms them; and
every kind of bad checkpoint must fail before any feature is computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image
from torchvision import transforms

from slidevl.features.encoders import EncoderError, get_encoder
from slidevl.features.encoders.presets import PRESETS, EncoderPreset
from slidevl.features.encoders.timm_presets import build_timm_model

from slide_fixtures import write_aperio_slide

TIMM_PRESETS = sorted(name for name, p in PRESETS.items() if p.library == "timm")
HF_PRESETS = sorted(name for name, p in PRESETS.items() if p.library == "transformers")
# One block keeps every architecture's layer types (SwiGLU, registers, layer scale) at a fraction of the cost.
SHALLOW = {"depth": 1}


@pytest.fixture(scope="module")
def slide_tiles(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Six 256 px tissue tiles read by OpenSlide from a small Aperio-style slide at 0.5 µm/px."""
    path = write_aperio_slide(tmp_path_factory.mktemp("slide") / "s.svs", 2048, 1536, mpp=0.5)
    with openslide.OpenSlide(str(path)) as slide:
        corners = [(400, 400), (656, 400), (400, 656), (1400, 900), (1500, 1100), (700, 700)]
        return np.stack([np.asarray(slide.read_region(c, 0, (256, 256)).convert("RGB")) for c in corners])


def card_transform(preset: EncoderPreset) -> transforms.Compose:
    """The model card's torchvision pipeline, written out here independently of the package."""
    mode = transforms.InterpolationMode.BICUBIC if preset.interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    return transforms.Compose(
        [
            transforms.Resize(preset.resize, interpolation=mode),
            transforms.CenterCrop(preset.input_size),
            transforms.ToTensor(),
            transforms.Normalize(preset.mean, preset.std),
        ]
    )


def card_embedding(preset: EncoderPreset, output: torch.Tensor) -> torch.Tensor:
    """How each card turns the model's output into the embedding."""
    if preset.name == "virchow":
        return torch.cat([output[:, 0], output[:, 1:].mean(1)], dim=-1)
    if preset.name == "virchow2":
        return torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)
    return output


def save_timm(preset_name: str, folder: Path, *, seed: int = 0, **overrides: object) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(seed)
    preset = PRESETS[preset_name]
    model = build_timm_model(preset, **{**SHALLOW, **overrides}).eval()
    folder.mkdir(parents=True, exist_ok=True)
    name = preset.weight_files[0]
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / name))
    else:
        torch.save(model.state_dict(), folder / name)
    return model, folder / name


@pytest.fixture()
def shallow_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timm preset built one block deep, so ``NAME:PATH`` specs load the shallow test files."""
    for name in TIMM_PRESETS:
        monkeypatch.setitem(PRESETS, name, PRESETS[name].with_kwargs(**SHALLOW))


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_timm_preset_matches_the_library_forward(name: str, tmp_path: Path, slide_tiles: np.ndarray, shallow_presets: None) -> None:
    preset = PRESETS[name]
    reference, _ = save_timm(name, tmp_path / name)
    encoder = get_encoder(f"{name}:{tmp_path / name}")
    features = encoder.encode_tiles(slide_tiles)
    assert features.shape == (len(slide_tiles), preset.feature_dim)
    assert features.dtype == np.float32
    batch = torch.stack([card_transform(preset)(Image.fromarray(t)) for t in slide_tiles])
    with torch.inference_mode():
        expected = card_embedding(preset, reference(batch)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert encoder.provenance()["preset"]["name"] == name


@pytest.mark.parametrize("name", HF_PRESETS)
def test_transformers_preset_matches_the_library_forward(name: str, tmp_path: Path, slide_tiles: np.ndarray) -> None:
    import transformers

    preset = PRESETS[name]
    config_class = getattr(transformers, preset.architecture).config_class
    hidden = preset.feature_dim
    config = config_class(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                          image_size=224, patch_size=16 if name == "phikon" else 14)
    torch.manual_seed(0)
    # Phikon's checkpoint ships a pooler that its card drops; save one to check it is tolerated.
    reference = getattr(transformers, preset.architecture)(config).eval()
    folder = tmp_path / name
    reference.save_pretrained(folder)
    encoder = get_encoder(f"{name}:{folder}")
    features = encoder.encode_tiles(slide_tiles)
    assert features.shape == (len(slide_tiles), preset.feature_dim)
    batch = torch.stack([card_transform(preset)(Image.fromarray(t)) for t in slide_tiles])
    with torch.inference_mode():
        expected = reference(pixel_values=batch).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_weight_file_itself_and_hub_cache_folder(tmp_path: Path, slide_tiles: np.ndarray, shallow_presets: None) -> None:
    _, file = save_timm("uni", tmp_path / "models--MahmoodLab--UNI" / "snapshots" / "abc123")
    by_file = get_encoder(f"uni:{file}").encode_tiles(slide_tiles[:2])
    by_cache = get_encoder(f"uni:{tmp_path / 'models--MahmoodLab--UNI'}").encode_tiles(slide_tiles[:2])
    np.testing.assert_array_equal(by_file, by_cache)


def test_checkpoint_wrapped_and_prefixed_by_ddp_loads(tmp_path: Path, slide_tiles: np.ndarray, shallow_presets: None) -> None:
    model, file = save_timm("uni", tmp_path / "plain")
    wrapped = tmp_path / "wrapped" / "pytorch_model.bin"
    wrapped.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    np.testing.assert_array_equal(
        get_encoder(f"uni:{file}").encode_tiles(slide_tiles[:2]), get_encoder(f"uni:{wrapped}").encode_tiles(slide_tiles[:2])
    )


def _broken(tmp_path: Path, edit: str) -> Path:
    model, file = save_timm("uni", tmp_path / edit)
    state = model.state_dict()
    if edit == "missing":
        state.pop("blocks.0.attn.qkv.weight")
    elif edit == "unexpected":
        state["head.weight"] = torch.zeros(3, 1024)
    elif edit == "shape":
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(16, 1024)
    torch.save(state, file)
    return file.parent


@pytest.mark.parametrize("edit,words", [("missing", "missing key"), ("unexpected", "unexpected key"), ("shape", "shape mismatch")])
def test_bad_checkpoint_fails_naming_file_and_preset(tmp_path: Path, edit: str, words: str, shallow_presets: None) -> None:
    folder = _broken(tmp_path, edit)
    with pytest.raises(EncoderError) as info:
        get_encoder(f"uni:{folder}")
    message = str(info.value)
    assert words in message and "uni" in message and str(folder / "pytorch_model.bin") in message


def test_wrong_models_file_fails(tmp_path: Path, shallow_presets: None) -> None:
    _, file = save_timm("gigapath", tmp_path / "giga")
    with pytest.raises(EncoderError, match="does not fit the virchow2 architecture"):
        get_encoder(f"virchow2:{file}")


def test_missing_and_unreadable_files_fail(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="does not exist"):
        get_encoder(f"uni:{tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("weights go here")
    with pytest.raises(EncoderError, match=r"holds no pytorch_model.bin \(found: README.md\)"):
        get_encoder(f"uni:{empty}")
    html = empty / "pytorch_model.bin"
    html.write_text("<html>401 Unauthorized</html>")
    with pytest.raises(EncoderError, match="could not be read as a checkpoint"):
        get_encoder(f"uni:{empty}")
    with pytest.raises(EncoderError, match="not a weight file"):
        get_encoder(f"uni:{empty / 'README.md'}")


def test_unregistered_name_alone_says_how_to_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDEVL_CONFIG_DIR", str(tmp_path))
    with pytest.raises(EncoderError, match="slidevl encoders register uni"):
        get_encoder("uni")


def test_registered_name_alone_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slide_tiles: np.ndarray, shallow_presets: None) -> None:
    from slidevl.features.encoders.user_config import register

    monkeypatch.setenv("SLIDEVL_CONFIG_DIR", str(tmp_path / "config"))
    save_timm("kaiko-vits16", tmp_path / "kaiko")
    register("kaiko-vits16", tmp_path / "kaiko")
    assert get_encoder("kaiko-vits16").encode_tiles(slide_tiles[:1]).shape == (1, 384)


def test_position_embedding_grid_taken_from_the_checkpoint(tmp_path: Path, slide_tiles: np.ndarray, shallow_presets: None) -> None:
    """Ports that store a 518 px position embedding still load strictly and run 224 px tiles."""
    reference, file = save_timm("kaiko-vitl14", tmp_path / "k", img_size=518)
    encoder = get_encoder(f"kaiko-vitl14:{file}")
    assert encoder.provenance()["img_size_from_checkpoint"] == 518
    batch = torch.stack([card_transform(PRESETS["kaiko-vitl14"])(Image.fromarray(t)) for t in slide_tiles[:2]])
    with torch.inference_mode():
        np.testing.assert_allclose(encoder.encode_tiles(slide_tiles[:2]), reference(batch).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_full_size_uni(tmp_path: Path, slide_tiles: np.ndarray) -> None:
    """The real 24-block ViT-L/16 of UNI, saved as the hub ships it and loaded by its spec."""
    reference, _ = save_timm("uni", tmp_path / "uni", depth=24)
    encoder = get_encoder(f"uni:{tmp_path / 'uni'}")
    batch = torch.stack([card_transform(PRESETS["uni"])(Image.fromarray(t)) for t in slide_tiles])
    with torch.inference_mode():
        expected = reference(batch).numpy()
    np.testing.assert_allclose(encoder.encode_tiles(slide_tiles), expected, rtol=1e-4, atol=1e-4)


def test_preprocess_cli_with_a_preset_spec(tmp_path: Path, shallow_presets: None) -> None:
    """`slidevl preprocess SLIDES --out JOB --encoder NAME:PATH`: real reads, the preset's features in the store."""
    from typer.testing import CliRunner

    from slidevl.features.cli import app
    from slidevl.features.store import FeatureStore

    (tmp_path / "slides").mkdir()
    write_aperio_slide(tmp_path / "slides" / "a.svs", 1536, 1536, mpp=0.5)
    save_timm("kaiko-vits16", tmp_path / "kaiko")
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "slides"), "--out", str(tmp_path / "job"),
                                      "--encoder", f"kaiko-vits16:{tmp_path / 'kaiko'}", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "job")
    features = store.load("a")
    assert features.patch_features.shape[1] == 384
    assert features.attrs["target_mpp"] == PRESETS["kaiko-vits16"].mpp
    assert features.attrs["encoder_provenance"]["preset"]["hub_repo"].startswith("1aurent/")


def test_transformers_preset_with_a_missing_weight_fails(tmp_path: Path) -> None:
    """A Phikon-v2 folder whose safetensors lacks a tensor is refused, never run half-random."""
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                       image_size=224, patch_size=14)
    folder = tmp_path / "phikon-v2"
    transformers.Dinov2Model(config).save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    state.pop(next(k for k in state if "attention" in k))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EncoderError, match=r"phikon-v2: .*model.safetensors does not fit the phikon-v2 architecture"):
        get_encoder(f"phikon-v2:{folder}")
    (folder / "config.json").unlink()
    with pytest.raises(EncoderError, match="has no config.json"):
        get_encoder(f"phikon-v2:{folder}")
