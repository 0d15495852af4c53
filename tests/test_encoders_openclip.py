"""``openclip:`` adapter: spec and path errors, the torchvision message, and model loading."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slidevl.features.encoders import EncoderError, get_encoder
from slidevl.features.encoders.openclip import OPENCLIP_CONFIG, parse_openclip_spec
from slidevl.features.encoders.synthetic import synthetic_tiles


TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
PREPROCESS = {"size": 32, "mean": [0.5, 0.4, 0.6], "std": [0.2, 0.3, 0.25], "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture()
def clip_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / OPENCLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": PREPROCESS}))
    # Placeholder weights: the stand-in module never reads them; the real test overwrites them.
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"placeholder")
    return folder


class _BrokenOpenClip(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import open_clip`` fail the way it does beside a mismatched torchvision."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "open_clip" else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise RuntimeError("operator torchvision::nms does not exist")


def test_mismatched_torchvision_gives_a_clear_message(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenOpenClip(), *sys.meta_path])
    with pytest.raises(EncoderError) as info:
        get_encoder(f"openclip:{clip_dir}")
    message = str(info.value)
    assert "torchvision::nms" in message and "requires torchvision" in message and torch.__version__ in message


def test_bad_specs_and_paths_fail_before_importing(tmp_path: Path, clip_dir: Path) -> None:
    with pytest.raises(EncoderError, match=r"does not exist.*open_clip_config\.json"):
        get_encoder(f"openclip:{tmp_path / 'missing'}")
    with pytest.raises(EncoderError, match="has no open_clip_config.json"):
        get_encoder(f"openclip:{tmp_path}")
    (clip_dir / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(EncoderError, match="but no weights"):
        get_encoder(f"openclip:{clip_dir}")
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(EncoderError, match="needs its architecture.*ViT-B-16@"):
        get_encoder(f"openclip:{checkpoint}")
    with pytest.raises(EncoderError, match="names no path"):
        get_encoder("openclip:")
    assert parse_openclip_spec(f"ViT-B-16@{checkpoint}") == ("ViT-B-16", checkpoint)
    assert parse_openclip_spec(str(clip_dir)) == (None, clip_dir)


class _FakeVisual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)
        self.preprocess_cfg = dict(PREPROCESS)


class _FakeClip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _FakeVisual()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.proj(x.mean(dim=(2, 3)))


def test_adapter_calls_open_clip_as_documented(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter's use of open_clip's API, against a stand-in module with that API."""
    calls: list[dict[str, Any]] = []
    torch.manual_seed(0)
    model = _FakeClip()

    def create_model_and_transforms(model_name: str, pretrained: str | None = None, device: Any = "cpu",
                                    pretrained_image: bool = False, pretrained_text: bool = True) -> tuple:
        calls.append(dict(model_name=model_name, pretrained=pretrained, pretrained_text=pretrained_text))
        return model, None, None

    fake = types.ModuleType("open_clip")
    fake.create_model_and_transforms = create_model_and_transforms
    monkeypatch.setitem(sys.modules, "open_clip", fake)

    enc = get_encoder(f"openclip:{clip_dir}")
    assert calls[-1] == {"model_name": f"local-dir:{clip_dir}", "pretrained": None, "pretrained_text": False}
    assert (enc.name, enc.input_size, enc.feature_dim) == ("openclip-tiny-clip", 32, 6)
    tiles = synthetic_tiles("tumour", 3, 256, seed=0)
    x = enc.worker_transform(tiles)
    assert x.shape == (3, 3, 32, 32)
    assert torch.allclose(x.mean(dim=(0, 2, 3)) * torch.tensor(PREPROCESS["std"]) + torch.tensor(PREPROCESS["mean"]),
                          torch.from_numpy(tiles).float().div(255).mean(dim=(0, 1, 2)), atol=0.02)
    with torch.no_grad():
        np.testing.assert_allclose(enc.encode(x), model.encode_image(x).numpy(), rtol=1e-6)
    json.dumps(enc.provenance())

    checkpoint = tmp_path / "vit_b16.pt"
    checkpoint.write_bytes(b"weights")
    enc = get_encoder(f"openclip:ViT-B-16@{checkpoint}")
    assert calls[-1]["model_name"] == "ViT-B-16" and calls[-1]["pretrained"] == str(checkpoint)
    assert enc.name == "openclip-ViT-B-16-vit_b16"


def test_real_open_clip_checkpoint(clip_dir: Path) -> None:
    import open_clip

    torch.manual_seed(0)
    (clip_dir / "open_clip_pytorch_model.bin").unlink()  # the placeholder; open_clip would try to read it
    model = open_clip.create_model(f"local-dir:{clip_dir}").eval()
    torch.save(model.state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    enc = get_encoder(f"openclip:{clip_dir}")
    assert enc.input_size == 32 and enc.feature_dim == 16
    x = enc.worker_transform(synthetic_tiles("stroma", 2, 256, seed=1))
    with torch.no_grad():
        expected = model.encode_image(x).numpy()
    np.testing.assert_allclose(enc.encode(x), expected, rtol=1e-4, atol=1e-5)
