"""The contract every tile-encoder kind, preset library and preset keeps, read from the registries.

* Every spec kind in ``ENCODERS`` and every library in ``PRESET_LIBRARIES`` is built
  from a small random model saved in a temporary folder, the way a user's download
  looks, and must encode tiles read by OpenSlide into ``(n, feature_dim)`` float32 rows
  that depend on the tile, the same in a DataLoader worker copy and when the spec is
  loaded again. A new kind or library fails here until this file gets a recipe for
  its small model (:data:`KIND_MODELS`, :data:`LIBRARY_MODELS`).
* Every preset's record is complete and consistent: library, weight file names, input
  size, mean/std, mpp, licence, hub repository, and an architecture whose output
  width, pooled as the preset says, is its ``feature_dim``.
"""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import re
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import openslide
import pytest
import torch

from slidevl.features.encoders import conch as conch_module
from slidevl.features.encoders.base import TileEncoder
from slidevl.features.encoders.openclip import OPENCLIP_CONFIG
from slidevl.features.encoders.preset_encoder import pool_tokens
from slidevl.features.encoders.presets import PRESETS, EncoderPreset, Pooling, default_mpp, preset_for_spec
from slidevl.features.encoders.registry import ENCODERS, PRESET_LIBRARIES, get_encoder, list_encoders
from slidevl.features.encoders.timm_presets import build_timm_model
from slidevl.features.encoders.weights import WEIGHT_SUFFIXES

from slide_fixtures import write_aperio_slide
from test_encoders_conch import save_tiny_conch, tiny_conch_cfg
from test_encoders_openclip import PREPROCESS, TINY_MODEL_CFG
from test_encoders_presets import save_timm

# A recipe saves a small random model under the folder it is given and returns the spec that loads it.
Recipe = Callable[[Path, pytest.MonkeyPatch], str]


def _handcrafted(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return "handcrafted"


def _hf(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return f"hf:{folder}"


def _openclip(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import open_clip

    folder.mkdir(parents=True)
    (folder / OPENCLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": PREPROCESS}))
    torch.save(open_clip.create_model(f"local-dir:{folder}").state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"openclip:{folder}"


def _timm(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # The smallest preset at its published size (12 blocks), as its hub folder ships it.
    save_timm("kaiko-vits16", folder, depth=12)
    return f"kaiko-vits16:{folder}"


def _transformers(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from transformers import ViTConfig, ViTModel

    # Phikon's ViT-B/16 at full width, one layer deep: saved with its config.json, as the hub ships it.
    ViTModel(ViTConfig(num_hidden_layers=1, image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
    return f"phikon:{folder}"


def _conch(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # CONCH's packaged architecture with one narrow block per tower; the preset loads it by that config.
    cfg = tiny_conch_cfg()
    save_tiny_conch(folder)
    monkeypatch.setattr(conch_module, "conch_config", lambda architecture="conch_ViT-B-16": copy.deepcopy(cfg))
    return f"conch:{folder}"


KIND_MODELS: dict[str, Recipe] = {"handcrafted": _handcrafted, "hf": _hf, "openclip": _openclip}
LIBRARY_MODELS: dict[str, Recipe] = {"timm": _timm, "transformers": _transformers, "conch": _conch}
ENTRIES = [("kind", name) for name in ENCODERS.names()] + [("library", name) for name in PRESET_LIBRARIES.names()]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Four 256 px tissue tiles read by OpenSlide from a small Aperio-style slide at 0.5 µm/px."""
    path = write_aperio_slide(tmp_path_factory.mktemp("slide") / "s.svs", 1024, 768, mpp=0.5)
    with openslide.OpenSlide(str(path)) as slide:
        return np.stack([np.asarray(slide.read_region(c, 0, (256, 256)).convert("RGB"))
                         for c in [(200, 200), (456, 200), (300, 400), (600, 300)]])


def test_list_encoders_names_the_kinds_then_the_presets() -> None:
    names = list_encoders()
    assert names == [*ENCODERS.names(), *PRESETS] and len(set(names)) == len(names)
    assert names[0] == "handcrafted" and {"hf", "openclip", "uni", "kaiko-vits16"} <= set(names)


@pytest.mark.parametrize(("what", "name"), ENTRIES, ids=[f"{w}-{n}" for w, n in ENTRIES])
def test_every_encoder_builds_and_encodes_tiles(what: str, name: str, tiles: np.ndarray, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = KIND_MODELS if what == "kind" else LIBRARY_MODELS
    if name not in recipes:
        pytest.fail(f"{what} {name!r} has no small model to test with: add a recipe to "
                    f"{'KIND_MODELS' if what == 'kind' else 'LIBRARY_MODELS'} in {Path(__file__).name}")
    torch.manual_seed(0)
    spec = recipes[name](tmp_path / "model", monkeypatch)
    encoder = get_encoder(spec)
    assert isinstance(encoder, TileEncoder)
    assert encoder.name and encoder.revision and encoder.input_size > 0 and encoder.feature_dim > 0
    preset = preset_for_spec(spec)
    if what == "library":
        assert preset is not None and preset.library == name
        assert (encoder.feature_dim, encoder.input_size) == (preset.feature_dim, preset.input_size)

    features = encoder.encode_tiles(tiles)
    assert features.shape == (len(tiles), encoder.feature_dim) and features.dtype == np.float32
    assert np.isfinite(features).all() and not np.allclose(features[0], features[1]), "features must depend on the tile"
    provenance = json.loads(json.dumps(encoder.provenance()))
    assert provenance["feature_dim"] == encoder.feature_dim and provenance["name"] == encoder.name

    # DataLoader workers get a pickled copy that only transforms; the main process encodes.
    worker = pickle.loads(pickle.dumps(encoder))
    np.testing.assert_allclose(encoder.encode(worker.worker_transform(tiles)), features, rtol=1e-6, atol=1e-6)
    # The spec is the checkpoint: loading it again gives the same revision and the same features.
    again = get_encoder(spec)
    assert again.revision == encoder.revision
    np.testing.assert_allclose(again.encode_tiles(tiles), features, rtol=1e-6, atol=1e-6)


def _timm_width(preset: EncoderPreset) -> int:
    # One block is enough for the width; the meta device builds it without allocating weights.
    with torch.device("meta"):
        model = build_timm_model(preset, depth=1)
        tokens = model(torch.zeros(1, 3, preset.input_size, preset.input_size))
    return int(pool_tokens(tokens, preset.pooling, int(model.num_prefix_tokens)).shape[-1])


def _transformers_width(preset: EncoderPreset) -> int:
    import transformers

    model_class = getattr(transformers, preset.architecture)
    assert issubclass(model_class, transformers.PreTrainedModel)
    assert "pixel_values" in inspect.signature(model_class.forward).parameters
    # The width comes with the checkpoint's config.json; the default config does not hold it.
    return preset.feature_dim


def _conch_width(preset: EncoderPreset) -> int:
    cfg = conch_module.conch_config(preset.architecture)
    assert cfg["vision_cfg"]["image_size"] == preset.input_size
    return int(cfg["embed_dim"])  # the contrastive pool's width: the patch feature before proj_contrast


ARCHITECTURE_WIDTH: dict[str, Callable[[EncoderPreset], int]] = {
    "timm": _timm_width, "transformers": _transformers_width, "conch": _conch_width}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_record_is_complete_and_consistent(name: str) -> None:
    preset = PRESETS[name]
    assert preset.name == name == name.strip().lower() and name not in ENCODERS
    assert preset.library in PRESET_LIBRARIES and preset.library in ARCHITECTURE_WIDTH
    assert preset.architecture and preset.feature_dim > 0
    assert preset.weight_files and all(Path(f).name == f and Path(f).suffix in WEIGHT_SUFFIXES for f in preset.weight_files)
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", preset.hub_repo) and preset.license.strip()
    assert 0 < preset.input_size <= preset.resize
    assert len(preset.mean) == len(preset.std) == 3
    assert all(0 <= m <= 1 for m in preset.mean) and all(0 < s <= 1 for s in preset.std)
    assert 0.1 <= preset.mpp <= 4 and preset.magnification == round(10 / preset.mpp, 1) and default_mpp(name) == preset.mpp
    assert preset.pooling in get_args(Pooling) and preset.interpolation in ("bicubic", "bilinear")
    assert json.loads(json.dumps(preset.describe()))["name"] == name
    assert preset_for_spec(f"{name}:/models/{name}") is preset
    assert ARCHITECTURE_WIDTH[preset.library](preset) == preset.feature_dim
