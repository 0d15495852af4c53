"""Zero-shot patch maps end to end: a tiny random CONCH on a tiny slide, through the CLI and the viewer.

The class probabilities must equal CONCH's own zero-shot rule computed here from the
model directly (``encode_image`` on tiles read by OpenSlide, ``encode_text`` on the
prompts), and the overlay must load in the viewer's evidence code and API.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
import typer
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from slidevl.features.encoders import conch as conch_module
from slidevl.features.encoders.conch import conch_tokenizer, tokenize
from slidevl.features.encoders.text import get_text_encoder
from slidevl.features.encoders.zeroshot_cli import zero_shot_command
from slidevl.features.zeroshot import ZeroShotError, class_probabilities, load_prompt_classes, zero_shot
from slidevl.serve.app import create_app
from slidevl.serve.job import ServeJob, read_geometry
from slidevl.serve.overlays import evidence_layers, parse_evidence

from slide_fixtures import write_aperio_slide
from test_encoders_conch import authors_transform, save_tiny_conch

CLASSES = {
    "tumour": ["an H&E image of tumour", "invasive carcinoma"],
    "stroma": ["an H&E image of stroma"],
    "background": ["white background, glass", "no tissue"],
}


@pytest.fixture()
def tiny_conch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model, cfg = save_tiny_conch(tmp_path / "CONCH", seed=1)
    # conch:PATH builds CONCH's packaged config; here that is the reduced one.
    monkeypatch.setattr(conch_module, "conch_config", lambda architecture="conch_ViT-B-16": copy.deepcopy(cfg))
    get_text_encoder.cache_clear()
    yield model, tmp_path / "CONCH"
    get_text_encoder.cache_clear()


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(zero_shot_command)
    return app


def _expected_probabilities(model: torch.nn.Module, slide: Path, coords: np.ndarray) -> np.ndarray:
    """CONCH's zero-shot rule written out from the model itself."""
    with openslide.OpenSlide(str(slide)) as s:
        tiles = [np.asarray(s.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB")) for x, y in coords]
    x = torch.stack([authors_transform()(Image.fromarray(t)) for t in tiles])
    tokenizer = conch_tokenizer()
    with torch.inference_mode():
        image = model.encode_image(x)
        classes = []
        for prompts in CLASSES.values():
            emb = model.encode_text(tokenize(tokenizer, prompts)).mean(dim=0)
            classes.append(emb / emb.norm())
        logits = model.logit_scale.exp() * image @ torch.stack(classes).T
    return logits.softmax(dim=1).numpy()


def test_zero_shot_on_a_slide_then_on_its_job(tiny_conch, tmp_path: Path) -> None:
    model, weights = tiny_conch
    (tmp_path / "slides").mkdir()
    slide = write_aperio_slide(tmp_path / "slides" / "S1.svs", 1024, 768, mpp=0.5)
    prompts = tmp_path / "classes.json"
    prompts.write_text(json.dumps(CLASSES))
    job = tmp_path / "job"
    result = CliRunner().invoke(_cli(), [str(slide), "--encoder", f"conch:{weights}", "--prompts", str(prompts),
                                         "--out", str(job), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    results = job / "zeroshot" / "classes"
    assert f"view: slidevl serve {job} --survival-run {results}" in result.output

    evidence = json.loads((results / "evidence" / "S1.json").read_text())
    probs = np.asarray(evidence["patch"]["probabilities"])
    coords = np.asarray(evidence["patch"]["coords"])
    assert probs.shape == (len(coords), 3) and len(coords) >= 3
    np.testing.assert_allclose(probs, _expected_probabilities(model, slide, coords), atol=2e-4)
    assert evidence["patch"]["prompt_index"] == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(evidence["patch"]["alignment"], probs.max(axis=1), atol=1e-5)
    assert evidence["classes"] == list(CLASSES)
    heatmap = Image.open(results / "heatmaps" / "S1.png")
    assert heatmap.mode == "RGB" and min(heatmap.size) > 1
    summary = json.loads((results / "summary.json").read_text())
    assert summary["text_space"].startswith("conch:") and summary["stored_feature_dtype"] == {"S1": "float32"}
    assert sum(summary["patch_counts"]["S1"].values()) == len(coords)

    # The viewer: the overlay parses, draws against the job's geometry, and is served.
    feature_file = job / "features" / "conch" / "S1.h5"
    ev = parse_evidence(evidence, "evidence/S1.json")
    layers = evidence_layers(ev, read_geometry(feature_file), "evidence/S1.json")
    names = {layer["name"] for layer in layers["layers"]}
    assert names == {"patch_opl_tokens", "patch_alignment"}
    assert [p["label"] for p in layers["prompts"]["patch"]] == list(CLASSES)
    with TestClient(create_app(ServeJob(job, survival_run=results))) as client:
        served = client.get("/api/slides/S1/overlays/evidence")
        assert served.status_code == 200, served.text
        assert served.json()["model"].startswith("zero-shot conch:")

    # On the job: the stored (float32) features give the same map, without reading a tile.
    again = zero_shot(job, f"conch:{weights}", prompts, tmp_path / "again", progress=False)
    rerun = json.loads((again.results / "evidence" / "S1.json").read_text())
    np.testing.assert_allclose(rerun["patch"]["probabilities"], probs, atol=1e-5)


def test_zero_shot_refuses_features_of_another_model(tiny_conch, tmp_path: Path) -> None:
    model, weights = tiny_conch
    prompts = tmp_path / "classes.yaml"
    prompts.write_text("tumour: an H&E image of tumour\nstroma:\n  - stroma\n")
    job = tmp_path / "job"
    (job / "features" / "handcrafted").mkdir(parents=True)
    (job / "manifest.json").write_text(json.dumps({"slides": []}))
    with pytest.raises(ZeroShotError, match=r"no features from conch .*handcrafted.*--encoder"):
        zero_shot(job, f"conch:{weights}", prompts, progress=False)
    with pytest.raises(ZeroShotError, match="pass --out JOB"):
        zero_shot(tmp_path / "slides", f"conch:{weights}", prompts, progress=False)
    with pytest.raises(ZeroShotError, match="has no text tower"):
        zero_shot(job, "minilm", prompts, progress=False)


def test_prompt_files_and_probabilities(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('tumour = ["a", "b"]\nstroma = "c"\n')
    classes = load_prompt_classes(toml)
    assert classes.names == ("tumour", "stroma") and classes.prompts == (("a", "b"), ("c",))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tumour": ["a"], "stroma": []}))
    with pytest.raises(ZeroShotError, match=r"bad.json: class 'stroma' needs"):
        load_prompt_classes(bad)
    bad.write_text(json.dumps({"only": ["a"]}))
    with pytest.raises(ZeroShotError, match="at least two class names"):
        load_prompt_classes(bad)
    img = np.eye(2, dtype=np.float32)
    p = class_probabilities(img, img, 100.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert p[0, 0] > 0.999 and p[1, 1] > 0.999


OPENCLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def test_openclip_text_tower_shares_the_image_space(tmp_path: Path) -> None:
    import open_clip

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENCLIP_CFG, "preprocess_cfg": {"size": 32}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    get_text_encoder.cache_clear()
    try:
        text = get_text_encoder(f"openclip:{folder}")
        enc = text.image_encoder
        assert text.space == f"{enc.name}:{enc.revision}" and text.dim == 16
        texts = ["tumour", "fat and stroma"]
        with torch.inference_mode():
            expected = torch.nn.functional.normalize(enc.model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(texts)), dim=-1)
        np.testing.assert_allclose(text.encode(texts), expected.numpy(), atol=1e-6)
        feats = enc.encode_tiles(np.zeros((2, 32, 32, 3), np.uint8))
        np.testing.assert_allclose(text.image_embeddings(feats), feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-6)
    finally:
        get_text_encoder.cache_clear()
    cfg = copy.deepcopy(OPENCLIP_CFG)
    cfg["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased"
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": 32}}))
    from slidevl.features.encoders.base import EncoderError

    with pytest.raises(EncoderError, match="holds no tokenizer.json.*nothing is downloaded"):
        get_text_encoder(f"openclip:{folder}")
    get_text_encoder.cache_clear()
