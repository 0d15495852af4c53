"""Pretraining on tiny synthetic slides: the loss falls, checkpoints save, load and resume."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from slidevl.slidellm.encoder import TopoPackConfig, collate_batches, load_encoder
from slidevl.slidellm.encoder.synthetic import synthetic_slide
from slidevl.errors import CheckpointError
from slidevl.slidellm.pretrain import (
    MemorySource,
    PretrainConfig,
    load_checkpoint,
    mae_loss,
    mae_mask,
    models_from_checkpoint,
    pretrain,
    slide_key,
)


ENC = TopoPackConfig(patch_dim=32, pack_dim=24, global_dim=16, d_model=32, n_layers=1, n_heads=4, ffn_dim=64, dropout=0.0)


def _source(n: int = 3) -> MemorySource:
    return MemorySource([synthetic_slide(12, 12, seed=i, slide_id=f"s{i}").batch for i in range(n)])


def _config(**kw) -> PretrainConfig:
    base = dict(
        mae_steps=4, moco_steps=3, warmup_steps=1, lr=2e-3, save_every=100, moco_queue=64, moco_enqueue=8,
        moco_queries=32, moco_dim=16, max_packs=64, decoder_dim=32, decoder_heads=4,
    )
    base.update(kw)
    return PretrainConfig(**base)


def _fixed_mae_loss(directory, source: MemorySource, phase: int) -> float:
    """MAE loss of the checkpoint's model on fixed masks of every slide (no augmentation)."""
    model, _, _ = models_from_checkpoint(directory)
    model.eval()
    batch = collate_batches([source.load(s) for s in source.slide_ids()])
    losses = []
    with torch.no_grad():
        for seed in range(4):
            mask = mae_mask(batch, phase, torch.Generator().manual_seed(seed))
            losses.append(mae_loss(model("mae", batch, mask), batch, mask).item())
    return float(np.mean(losses))


def test_mae_pretraining_lowers_the_loss(tmp_path) -> None:
    source = _source()
    cfg = _config(mae_steps=40, moco_steps=0, phase1_fraction=0.5, warmup_steps=2, save_every=1000)
    pretrain(source, tmp_path, config=cfg, encoder_config=ENC, progress=False, stop_after=1)
    early = {p: _fixed_mae_loss(tmp_path, source, p) for p in (1, 2)}
    result = pretrain(source, tmp_path, config=cfg, resume=True, progress=False)
    late = {p: _fixed_mae_loss(tmp_path, source, p) for p in (1, 2)}
    assert result.step == 40
    for p in (1, 2):
        assert late[p] < 0.9 * early[p], (p, early, late)
    stages = [(row["stage"], row["phase"]) for row in result.log]
    assert stages == [("mae", 1)] * 20 + [("mae", 2)] * 20


def test_moco_stage_runs_and_logs(tmp_path) -> None:
    result = pretrain(_source(), tmp_path, config=_config(mae_steps=1, moco_steps=6), encoder_config=ENC, progress=False)
    moco = [row for row in result.log if row["stage"] == "moco"]
    assert len(moco) == 6 and all(np.isfinite(row["moco_loss"]) for row in moco)
    # after the first step the queue supplies negatives from other slides
    assert moco[-1]["moco_negatives"] > 0
    _, momentum, _ = models_from_checkpoint(tmp_path)
    filled = momentum.queue.slides[momentum.queue.slides >= 0]
    # at most 8 keys per slide and step enter the queue, each labelled with its slide
    assert 8 < filled.numel() <= 8 * 6
    assert set(filled.tolist()) <= {slide_key(s) for s in ("s0", "s1", "s2")}


def test_checkpoint_files_and_exact_resume(tmp_path) -> None:
    source = _source()
    cfg = _config()
    enc_cfg = replace(ENC, dropout=0.1)  # dropout on: resume must restore its RNG stream too
    straight = pretrain(source, tmp_path / "a", config=cfg, encoder_config=enc_cfg, progress=False)
    pretrain(source, tmp_path / "b", config=cfg, encoder_config=enc_cfg, progress=False, stop_after=5)
    ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt.step == 5 and len(ckpt.log) == 5
    resumed = pretrain(source, tmp_path / "b", config=cfg, resume=True, progress=False)
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in straight.log]
    a, b = load_encoder(tmp_path / "a").state_dict(), load_encoder(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"encoder.safetensors", "encoder_config.json", "pretrain_state.safetensors", "pretrain_config.json",
            "train_state.pt", "loss_log.csv", "loss_log.json", "checkpoint.json"} <= names
    assert not any(n.endswith(".partial") for n in names)
    rows = list(csv.DictReader(open(tmp_path / "b" / "loss_log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 7
    # the train state is plain tensors and containers: loadable with weights_only
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["step"] == 7 and "optimizer" in state


def test_refuses_to_overwrite_and_rejects_changed_settings_on_resume(tmp_path) -> None:
    source = _source(2)
    pretrain(source, tmp_path, config=_config(mae_steps=1, moco_steps=0), encoder_config=ENC, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        pretrain(source, tmp_path, config=_config(mae_steps=1, moco_steps=0), encoder_config=ENC, progress=False)
    with pytest.raises(ValueError, match="mask_ratio"):
        pretrain(source, tmp_path, config=_config(mae_steps=2, moco_steps=0, mask_ratio=0.5), resume=True, progress=False)
    # extending the schedule is allowed
    result = pretrain(source, tmp_path, config=_config(mae_steps=2, moco_steps=0), resume=True, progress=False)
    assert result.step == 2


def test_interrupted_checkpoint_is_reported(tmp_path) -> None:
    pretrain(_source(2), tmp_path, config=_config(mae_steps=1, moco_steps=0), encoder_config=ENC, progress=False)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    manifest["step"] = 3
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="interrupted"):
        load_checkpoint(tmp_path)


def _write_store(job, n: int = 2) -> None:
    from slidevl.features.store import FeatureStore, SlideFeatures

    store = FeatureStore(job, encoder="toy")
    for i in range(n):
        s = synthetic_slide(9, 9, seed=i, slide_id=f"slide{i}", summary_fraction=1.0)
        b = s.batch
        valid = b.patch_valid[0]
        rows = b.patch_index[0][valid].numpy()
        order = np.argsort(rows)
        feats = b.patch_features[0][valid].numpy()[order]
        k = b.pack_size
        slots = torch.nonzero(valid)
        grid = (b.pack_grid[0][slots[:, 0]] * k + torch.stack([slots[:, 1] % k, slots[:, 1] // k], 1)).numpy()[order]
        pack_of = slots[:, 0].numpy()[order]
        store.write(
            SlideFeatures(
                slide_id=f"slide{i}", patch_features=feats, patch_coords=grid * 256, patch_grid=grid,
                patch_region=np.zeros(len(grid), np.int64), patch_pack=pack_of, patch_tissue=np.ones(len(grid), np.float32),
                pack_features=b.pack_features[0].numpy(), pack_coords=b.pack_grid[0].numpy() * 768,
                pack_grid=b.pack_grid[0].numpy(), global_feature=b.global_feature[0].numpy(), attrs={"pack_size": 3},
            ),
            float16=False,
        )


def test_cli_pretrain_and_resume(tmp_path) -> None:
    from typer.testing import CliRunner

    from slidevl.slidellm.cli import app

    job, out = tmp_path / "job", tmp_path / "ckpt"
    _write_store(job)
    small = ["--d-model", "32", "--layers", "1", "--heads", "4", "--ffn-dim", "64", "--moco-queue", "32", "--quiet"]
    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", "--features", str(job), "--out", str(out), "--mae-steps", "2", "--moco-steps", "1", *small])
    assert res.exit_code == 0, res.output
    assert "step 3" in res.output
    cfg = json.loads((out / "encoder_config.json").read_text())
    assert (cfg["patch_dim"], cfg["pack_dim"], cfg["global_dim"], cfg["d_model"]) == (32, 24, 16, 32)
    res = runner.invoke(app, ["pretrain", "--features", str(job), "--out", str(out), "--moco-steps", "2", "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    res = runner.invoke(app, ["pretrain", "--features", str(job), "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--resume" in res.output
