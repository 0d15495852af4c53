"""HiLa with prompts in the patch features' own space (CONCH's text tower for CONCH features)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from slidevl.features.encoders import conch as conch_module
from slidevl.features.encoders.text import get_text_encoder
from slidevl.survival.checkpoint import load_checkpoint
from slidevl.survival.cli import app
from slidevl.survival.data import PatientBag
from slidevl.survival.hila.model import HiLa
from slidevl.survival.hila.prompts import PromptError
from slidevl.survival.registry import model_from_config
from slidevl.survival.toy import make_toy_cohort

from test_encoders_conch import save_tiny_conch


def _aligned(in_dim: int = 12, text_dim: int = 10, region_dim: int | None = None, variant: str = "full") -> HiLa:
    g = torch.Generator().manual_seed(0)
    pt = F.normalize(torch.randn(4, 3, text_dim, generator=g), dim=-1)
    rt = F.normalize(torch.randn(4, 2, text_dim, generator=g), dim=-1)
    proj = torch.randn(in_dim, text_dim, generator=g)
    return HiLa(in_dim, region_dim or in_dim, pt, torch.ones(4, 3, dtype=torch.bool), rt, torch.ones(4, 2, dtype=torch.bool),
                dim=16, variant=variant, text_space="conch:abc", feature_projection=proj)


def test_aligned_opl_uses_the_models_own_cosine_and_no_bridge() -> None:
    model = _aligned().train()
    assert isinstance(model.patch_opl.text_proj, torch.nn.Identity)
    assert isinstance(model.region_opl.text_proj, torch.nn.Identity)
    assert not any("text_proj" in name for name, _ in model.named_parameters())
    g = torch.Generator().manual_seed(1)
    bag = PatientBag("P", 0, torch.randn(40, 12, generator=g), torch.randint(0, 5, (40,), generator=g),
                     torch.randn(5, 12, generator=g), [])
    out = model(bag, evidence=True)
    (out.logits.sum() + out.aux_loss).backward()
    # OPL on the features mapped into the text space equals the evidence the model reports.
    direct = model.patch_opl(bag.patch @ model.feature_projection)
    np.testing.assert_allclose(out.evidence["patch"]["alignment"], direct.alignment.numpy(), rtol=1e-5, atol=1e-6)
    sim = torch.einsum("lpd,md->lpm", model.patch_opl.text, F.normalize(bag.patch @ model.feature_projection, dim=-1))
    assert torch.allclose(torch.einsum("lpd,md->lpm", model.patch_opl.prompts(), F.normalize(bag.patch @ model.feature_projection, dim=-1)), sim)
    # A rebuilt model takes its projection from the checkpoint's buffers.
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    assert torch.allclose(model(bag).logits, rebuilt(bag).logits)


def test_aligned_dimensions_must_agree() -> None:
    g = torch.Generator().manual_seed(0)
    prompts, mask = torch.randn(4, 3, 10, generator=g), torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(PromptError, match=r"maps 12-d image features to 10-d prompts, but the patch features are 8-d"):
        HiLa(8, 8, prompts, mask, prompts, mask, text_space="conch:abc", feature_projection=torch.zeros(12, 10))
    with pytest.raises(PromptError, match=r"region tokens are 6-d, not patch features \(12-d\)"):
        _aligned(region_dim=6)
    assert _aligned(region_dim=6, variant="D").text_space == "conch:abc"  # patch level only: regions unused


@pytest.fixture()
def conch_cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A toy cohort whose 512-d features claim to come from a tiny random CONCH."""
    _, cfg = save_tiny_conch(tmp_path / "CONCH")
    monkeypatch.setattr(conch_module, "conch_config", lambda architecture="conch_ViT-B-16": copy.deepcopy(cfg))
    get_text_encoder.cache_clear()
    text = get_text_encoder(f"conch:{(tmp_path / 'CONCH').resolve()}")
    toy = make_toy_cohort(tmp_path / "toy", n_patients=12, dim=512, patches=(24, 40), encoder="conch", seed=3)
    for h5 in (toy.job / "features" / "conch").glob("*.h5"):
        with h5py.File(h5, "a") as f:
            f.attrs["encoder"], f.attrs["encoder_revision"], f.attrs["feature_dim"] = "conch", text.image_encoder.revision, 512
    yield toy, tmp_path / "CONCH", text
    get_text_encoder.cache_clear()


def test_cv_with_conch_prompts_records_the_text_space(conch_cohort, tmp_path: Path) -> None:
    toy, weights, text = conch_cohort
    args = ["cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--model", "hila", "--option", "dim=16",
            "--epochs", "1", "--grad-accum", "4", "--k", "2", "--device", "cpu", "--quiet", "--region-tokens", "pooled",
            "--text-encoder", f"conch:{weights}"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["text_space"] == text.space == f"conch:{text.image_encoder.revision}"
    assert summary["config"]["standardize"] is False
    config = json.loads((tmp_path / "run" / "fold_0" / "config.json").read_text())
    assert config["model"]["text_space"] == text.space and config["scaler"] is None
    # The saved fold rebuilds with CONCH's projection from its weights: prediction needs no text tower.
    model, _ = load_checkpoint(tmp_path / "run" / "fold_0")
    np.testing.assert_allclose(model.feature_projection.numpy(), text.feature_projection)

    # Features from another revision of the model are refused, naming the file.
    h5 = next((toy.job / "features" / "conch").glob("*.h5"))
    with h5py.File(h5, "a") as f:
        f.attrs["encoder_revision"] = "0123456789ab"
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2
    assert "prompts and features must share one model" in " ".join(result.output.split()) and h5.name in result.output.replace("\n", "")


def test_minilm_stays_a_space_of_its_own() -> None:
    from slidevl.features.encoders.text import encode_texts
    from slidevl.survival.hila.prompts import text_space_options

    text = get_text_encoder("minilm")
    assert (text.space, text.dim, text.aligned) == ("minilm", 384, False)
    emb = encode_texts(["tumour necrosis", "adipose tissue"])
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert text_space_options("minilm", store=None) == ("minilm", {})
