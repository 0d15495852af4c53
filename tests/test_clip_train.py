"""`slidevl encoders train-clip`: a small open_clip model aligned on the synthetic world.

A tiny cohort is rendered and preprocessed once; a small CLIP trains on its training
patients for a few epochs. It must learn (zero-shot tissue accuracy far above chance on
held-out patients), round-trip through ``openclip:DIR`` (image and text towers), and
rank matching caption/tile pairs first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slidevl.features.config import PreprocessConfig
from slidevl.features.encoders import get_encoder
from slidevl.features.encoders.captions import TileFacts, caption, class_prompts
from slidevl.features.encoders.clip_train import ClipTrainConfig, build_model, collect_tiles, split_patients, train_clip
from slidevl.features.encoders.text import get_text_encoder
from slidevl.features.pipeline import preprocess
from slidevl.synth import make_cohort

SMALL = ClipTrainConfig(vision_width=96, vision_layers=2, text_width=64, text_layers=2, embed_dim=64,
                        tiles_per_class=150, epochs=30, batch_size=64, lr=2e-3, heldout_fraction=0.34)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clip")
    make_cohort(root / "cohort", n_patients=6, seed=0, slide_px=3072, texture_px=512, progress=False)
    config = PreprocessConfig(workers=0, batch_size=64, progress=False, pack_features=False, global_feature=False)
    assert preprocess(root / "cohort" / "slides", root / "job", config).exit_code == 0
    with torch.random.fork_rng():
        torch.set_num_threads(2)
        report = train_clip(root / "cohort", root / "job", root / "clip", SMALL, progress=False, log=lambda _: None)
    return {"root": root, "report": report, "model": root / "clip"}


def test_captions_vary_and_carry_the_facts() -> None:
    rng = np.random.default_rng(0)
    facts = TileFacts({"tumour": 0.7, "lymphocytes": 0.25, "stroma": 0.05}, grade=3)
    texts = {caption(facts, rng) for _ in range(40)}
    assert len(texts) > 20
    assert all(("lymph" in t or "immune" in t) for t in texts)
    assert any("pleomorphism" in t or "atypia" in t or "irregular" in t for t in texts)
    assert len(class_prompts("fat")) >= 12


def test_patient_split_keeps_both_sides() -> None:
    train, held = split_patients(["a", "b", "c"], 0.9, seed=1)
    assert len(train) == 1 and len(held) == 2 and not set(train) & set(held)
    with pytest.raises(Exception, match="at least 2 patients"):
        split_patients(["a"], 0.25, seed=0)


def test_train_clip_learns_tissue_zero_shot(trained: dict) -> None:
    check = trained["report"]["zero_shot_heldout"]
    assert not set(trained["report"]["train_patients"]) & set(trained["report"]["heldout_patients"])
    confusion = np.array(check["confusion"])
    assert confusion.sum() == check["n_tiles"] > 50
    # Five classes, so a model that learnt nothing scores 0.2 balanced accuracy. With 4
    # training patients this tiny model's accuracy spreads with the cohort and the seed
    # (0.43-0.72 measured over two seeds and two layouts; it may confuse a whole class,
    # e.g. tumour with lymphocytes), so the test asks for clear learning on most classes,
    # not for the default recipe's accuracy (see ClipTrainConfig's docstring).
    recall = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    assert recall.mean() > 0.5, check
    assert (recall > 0.5).sum() >= 3, check
    losses = trained["report"]["loss_per_epoch"]
    assert losses[-1] < 0.7 * losses[0]


def test_model_round_trips_through_openclip_spec(trained: dict) -> None:
    from safetensors.torch import load_file

    reference = build_model(SMALL).eval()
    reference.load_state_dict(load_file(str(trained["model"] / "open_clip_model.safetensors")))
    encoder = get_encoder(f"openclip:{trained['model']}")
    tiles = np.random.default_rng(0).integers(0, 255, (3, 256, 256, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = reference.encode_image(SMALL.transform()(tiles)).numpy()
    np.testing.assert_allclose(encoder.encode_tiles(tiles), expected, rtol=1e-5, atol=1e-5)
    text = get_text_encoder(f"openclip:{trained['model']}")
    import open_clip

    tokens = open_clip.SimpleTokenizer(context_length=SMALL.context_length)(["adipose tissue."])
    with torch.inference_mode():
        direct = reference.encode_text(tokens).numpy()
    got = text.encode(["adipose tissue."])
    np.testing.assert_allclose(got / np.linalg.norm(got), direct / np.linalg.norm(direct), rtol=1e-4, atol=1e-5)


def test_matching_caption_tile_pairs_rank_first(trained: dict) -> None:
    """Held-out tiles of each class retrieve a caption of their own class before the others."""
    report = trained["report"]
    rng = np.random.default_rng(3)
    tiles = collect_tiles(trained["root"] / "cohort", trained["root"] / "job", set(report["heldout_patients"]),
                          dataclasses.replace(SMALL, tiles_per_class=20), rng)
    encoder = get_encoder(f"openclip:{trained['model']}")
    text = get_text_encoder(f"openclip:{trained['model']}")
    image = encoder.encode(tiles.images)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    captions = text.encode([caption(f, rng) for f in tiles.facts])
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    ranks = (image @ captions.T).argsort(1)[:, ::-1]
    same_class = tiles.tissues[ranks[:, 0]] == tiles.tissues
    assert same_class.mean() > 0.6


def test_cli_reports_the_check(trained: dict, tmp_path: Path) -> None:
    from slidevl.features.encoders.cli import app

    root = trained["root"]
    result = CliRunner().invoke(app, ["train-clip", "--cohort", str(root / "cohort"), "--job", str(root / "job"),
                                      "--out", str(tmp_path / "clip"), "--epochs", "1", "--tiles-per-class", "10",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "zero-shot tissue accuracy" in result.output and f"openclip:{tmp_path / 'clip'}" in result.output
    assert json.loads((tmp_path / "clip" / "report.json").read_text())["config"]["epochs"] == 1
    bad = CliRunner().invoke(app, ["train-clip", "--cohort", str(tmp_path), "--job", str(root / "job"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "truth.json" in bad.output


def test_patch_risk_follows_the_nearest_level() -> None:
    from slidevl.survival.zeroshot import patch_risk

    levels = np.eye(4, dtype=np.float32)[:3]  # three levels, high risk first
    patches = np.eye(4, dtype=np.float32)[[0, 2, 1]]
    risk = patch_risk(patches, levels, logit_scale=100.0)
    np.testing.assert_allclose(risk, [2.0, 0.0, 1.0], atol=1e-6)


def test_zero_shot_prognosis_on_aligned_features(trained: dict) -> None:
    from slidevl.features.config import PreprocessConfig as Config
    from slidevl.survival.hila.prompts import PromptError
    from slidevl.survival.zeroshot import zero_shot_prognosis

    root, spec = trained["root"], f"openclip:{trained['model']}"
    config = Config(encoder=spec, workers=0, progress=False, pack_features=False, global_feature=False)
    assert preprocess(root / "cohort" / "slides", root / "clip_job", config).exit_code == 0
    result = zero_shot_prognosis(root / "clip_job", root / "cohort" / "clinical.csv", spec)
    assert 0.0 <= result["c_index"] <= 1.0 and result["n_patients"] == 6
    assert result["text_space"].startswith("openclip-")
    with pytest.raises(PromptError, match="text tower"):
        zero_shot_prognosis(root / "clip_job", root / "cohort" / "clinical.csv", "minilm")
