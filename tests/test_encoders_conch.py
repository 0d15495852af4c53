"""CONCH v1 from the authors' code: patch features, prompt embeddings and strict loading.

The model is ``conch_ViT-B-16`` built by ``conch``'s own ``CoCa`` with random weights,
its towers reduced to one narrow block each so the test stays fast (the embedding
dimension, 448 px input, attentional poolers and tokenizer stay those of CONCH). It
is saved as the hub ships it (``pytorch_model.bin``) and loaded through ``conch:PATH``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image
from torchvision import transforms

from slidevl.features.encoders import EncoderError
from slidevl.features.encoders.conch import ConchEncoder, build_conch_model, conch_config, conch_tokenizer, tokenize

from slide_fixtures import write_aperio_slide

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["an H&E image of invasive ductal carcinoma", "normal breast tissue", "adipose tissue, fat", ""]


def tiny_conch_cfg() -> dict:
    """``conch_ViT-B-16`` with one narrow block per tower; everything else as shipped."""
    cfg = copy.deepcopy(conch_config())
    cfg["embed_dim_caption"] = 64
    cfg["vision_cfg"].update(layers=1, width=64, num_heads=2)
    cfg["text_cfg"].update(layers=1, width=64, heads=2)
    cfg["multimodal_cfg"].update(layers=1, width=64, heads=2)
    return cfg


def save_tiny_conch(folder: Path, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    cfg = tiny_conch_cfg()
    torch.manual_seed(seed)
    model = build_conch_model(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model, cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict, Path]:
    folder = tmp_path_factory.mktemp("conch") / "CONCH"
    model, cfg = save_tiny_conch(folder)
    return model, cfg, folder


@pytest.fixture(scope="module")
def slide_tiles(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Three 256 px tissue tiles read by OpenSlide from a small Aperio-style slide."""
    path = write_aperio_slide(tmp_path_factory.mktemp("slide") / "s.svs", 1024, 768, mpp=0.5)
    with openslide.OpenSlide(str(path)) as slide:
        return np.stack([np.asarray(slide.read_region(c, 0, (256, 256)).convert("RGB")) for c in [(200, 200), (330, 250), (600, 400)]])


def authors_transform() -> transforms.Compose:
    """``conch.open_clip_custom.transform.image_transform(448, OpenAI mean/std)``, written out."""
    return transforms.Compose([
        transforms.Resize(448, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(448),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def test_transform_equals_the_authors_image_transform() -> None:
    from conch.open_clip_custom.transform import image_transform

    from slidevl.features.encoders.preset_encoder import preset_transform
    from slidevl.features.encoders.presets import PRESETS

    tiles = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    theirs = image_transform(448, mean=OPENAI_MEAN, std=OPENAI_STD)
    expected = torch.stack([theirs(Image.fromarray(t)) for t in tiles])
    assert torch.equal(preset_transform(PRESETS["conch"])(tiles), expected)


def test_features_equal_encode_image_without_projection(tiny, slide_tiles: np.ndarray) -> None:
    model, cfg, folder = tiny
    enc = ConchEncoder(folder, model_cfg=cfg)
    assert (enc.name, enc.feature_dim, enc.input_size) == ("conch", 512, 448)
    x = torch.stack([authors_transform()(Image.fromarray(t)) for t in slide_tiles])
    with torch.inference_mode():
        expected = model.encode_image(x, proj_contrast=False, normalize=False).numpy()
        zeroshot = model.encode_image(x).numpy()
    feats = enc.encode_tiles(slide_tiles)
    assert feats.shape == (3, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    # Zero-shot embeddings: from the tiles, and from the stored features through the last projection.
    np.testing.assert_allclose(enc.encode_image_zeroshot(enc.worker_transform(slide_tiles)), zeroshot, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enc.project_features(feats), zeroshot, rtol=1e-4, atol=1e-5)
    assert enc.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    prov = enc.provenance()
    assert prov["kind"] == "conch" and prov["preset"]["name"] == "conch" and prov["revision"] == enc.revision
    assert prov["source"] == str((folder / "pytorch_model.bin").resolve())


def test_weight_file_path_and_revision(tiny) -> None:
    from slidevl.features.encoders.base import files_revision
    from slidevl.features.encoders.presets import PRESETS

    model, cfg, folder = tiny
    by_folder = ConchEncoder(folder, model_cfg=cfg)
    by_file = ConchEncoder(folder / "pytorch_model.bin", model_cfg=cfg)
    assert by_folder.revision == by_file.revision
    # A modified architecture never shares the revision of CONCH as shipped.
    assert by_folder.revision != files_revision([folder / "pytorch_model.bin"], extra=PRESETS["conch"].describe())


def test_tokenization_equals_conch_tokenize() -> None:
    """Our tokenisation is what CONCH's ``tokenize`` gives where ``batch_encode_plus`` still exists."""
    from conch.open_clip_custom import custom_tokenizer

    tokenizer = conch_tokenizer()
    if hasattr(tokenizer, "batch_encode_plus"):
        expected = custom_tokenizer.tokenize(tokenizer, PROMPTS)
    else:
        # transformers 5 removed it; for a list of strings it was __call__ with the same arguments.
        with pytest.raises(AttributeError, match="batch_encode_plus"):
            custom_tokenizer.tokenize(tokenizer, PROMPTS)

        class _Legacy:
            pad_token_id = tokenizer.pad_token_id

            @staticmethod
            def batch_encode_plus(texts, **kwargs):
                return tokenizer(texts, **kwargs)

        expected = custom_tokenizer.tokenize(_Legacy(), PROMPTS)
    ours = tokenize(tokenizer, PROMPTS)
    assert ours.shape == (4, 128) and torch.equal(ours, expected)
    assert ours[0, 0] == 1 and (ours[:, -1] == tokenizer.pad_token_id).all()
    long = tokenize(tokenizer, ["tumour " * 300])
    assert long.shape == (1, 128) and long[0, 126] == 2  # truncated to 127 with <end_of_text> kept


def test_text_embeddings_equal_encode_text(tiny) -> None:
    model, cfg, folder = tiny
    enc = ConchEncoder(folder, model_cfg=cfg)
    with torch.inference_mode():
        expected = model.encode_text(tokenize(conch_tokenizer(), PROMPTS)).numpy()
    got = enc.encode_text(PROMPTS)
    assert got.shape == (4, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bad_checkpoints_fail_naming_the_file(tiny, tmp_path: Path) -> None:
    model, cfg, folder = tiny
    state = model.state_dict()

    def saved(name: str, sd: dict) -> Path:
        path = tmp_path / name / "pytorch_model.bin"
        path.parent.mkdir()
        torch.save(sd, path)
        return path

    missing = saved("missing", {k: v for k, v in state.items() if k != "visual.proj_contrast"})
    with pytest.raises(EncoderError, match=r"missing.*pytorch_model.bin.*1 missing key.*visual.proj_contrast"):
        ConchEncoder(missing.parent, model_cfg=cfg)
    extra = saved("extra", {**state, "visual.head.weight": torch.zeros(2)})
    with pytest.raises(EncoderError, match=r"1 unexpected key.*visual.head.weight"):
        ConchEncoder(extra.parent, model_cfg=cfg)
    shape = saved("shape", {**state, "logit_scale": torch.zeros(3)})
    with pytest.raises(EncoderError, match=r"shape mismatch.*logit_scale"):
        ConchEncoder(shape.parent, model_cfg=cfg)
    # Another model's checkpoint (a timm ViT, as UNI ships) is the wrong file for the preset.
    import timm

    vit = saved("vit", timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict())
    with pytest.raises(EncoderError, match=r"conch: .*vit/pytorch_model.bin does not fit the conch architecture.*missing key"):
        ConchEncoder(vit.parent, model_cfg=cfg)
    with pytest.raises(EncoderError, match=r"does not exist.*pytorch_model.bin"):
        ConchEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match=r"empty holds no pytorch_model.bin"):
        ConchEncoder(tmp_path / "empty")
    junk = tmp_path / "junk" / "pytorch_model.bin"
    junk.parent.mkdir()
    junk.write_text("<html>401 unauthorised</html>")
    with pytest.raises(EncoderError, match=r"junk/pytorch_model.bin could not be read as a checkpoint"):
        ConchEncoder(junk.parent)


def test_conch_spec_goes_through_the_registry(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from slidevl.features.encoders import conch as conch_module
    from slidevl.features.encoders import get_encoder

    model, cfg, folder = tiny
    monkeypatch.setattr(conch_module, "conch_config", lambda architecture="conch_ViT-B-16": copy.deepcopy(cfg))
    enc = get_encoder(f"conch:{folder}")
    assert isinstance(enc, ConchEncoder) and enc.feature_dim == 512


@pytest.mark.slow
def test_full_size_conch_through_its_spec(tmp_path: Path, slide_tiles: np.ndarray) -> None:
    """The shipped ``conch_ViT-B-16`` at full size, saved as the hub ships it and loaded by ``conch:PATH``."""
    from slidevl.features.encoders import get_encoder

    torch.manual_seed(1)
    model = build_conch_model(copy.deepcopy(conch_config())).eval()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    enc = get_encoder(f"conch:{tmp_path}")
    x = torch.stack([authors_transform()(Image.fromarray(t)) for t in slide_tiles])
    with torch.inference_mode():
        expected = model.encode_image(x, proj_contrast=False, normalize=False).numpy()
        text = model.encode_text(tokenize(conch_tokenizer(), PROMPTS)).numpy()
    np.testing.assert_allclose(enc.encode_tiles(slide_tiles), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc.encode_text(PROMPTS), text, rtol=1e-4, atol=1e-5)
