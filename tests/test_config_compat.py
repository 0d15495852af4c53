"""Config files written before the settings classes shared :class:`slidevl.config.Config` still load.

The files in ``tests/data/configs_before_base`` were written by that code: a stage-1
``run.json`` (connector options as a plain dict, LoRA targets as a string), a
``connector.json`` from before ``patch_scaling`` existed, and a topo-pack encoder's and a
pretraining run's configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slidevl.errors import ConfigError
from slidevl.slidellm.connector import ConnectorConfig
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.pretrain.config import PretrainConfig
from slidevl.slidellm.tuning.config import TuneConfig

OLD = Path(__file__).parent / "data" / "configs_before_base"


def test_old_run_json_loads_with_its_settings() -> None:
    cfg = TuneConfig.load(OLD / "run.json")
    assert cfg.stage == "stage1" and cfg.train.epochs == 5 and cfg.train.batch_size == 8
    assert cfg.connector.given() == {"kind": "mlp", "pooled_tokens": True}
    # A resumed run compares the saved config with the new one: an equal run has no differences.
    again = TuneConfig.from_dict(cfg.to_dict())
    assert cfg.differences(again) == []


def test_untagged_run_json_keeps_the_connector_it_meant(tmp_path: Path) -> None:
    # Before run.json carried its class tag, an unnamed connector was the Q-Former and the MLP pooled nothing.
    import json

    old = json.loads((OLD / "run.json").read_text())
    for given, meant in (({"kind": "mlp"}, {"kind": "mlp", "pooled_tokens": False}),
                         ({}, {"kind": "qformer", "pooled_tokens": False}),
                         ({"kind": "mlp", "pooled_tokens": True}, {"kind": "mlp", "pooled_tokens": True})):
        (tmp_path / "run.json").write_text(json.dumps({**old, "connector": given}))
        assert TuneConfig.load(tmp_path / "run.json").connector.given() == meant
    # With --init the checkpoint's connector applied: nothing is filled in.
    (tmp_path / "run.json").write_text(json.dumps({**old, "stage": "stage2", "init": "runs/stage1", "connector": {}}))
    assert TuneConfig.load(tmp_path / "run.json").connector.given() == {}
    # A run.json written now is tagged and reads back as written: an unnamed MLP pools.
    fresh = TuneConfig.from_dict({**old, "connector": {"kind": "mlp"}})
    fresh.save(tmp_path / "new.json")
    again = TuneConfig.load(tmp_path / "new.json")
    assert again.connector.given() == {"kind": "mlp"} and again.differences(fresh) == []
    assert again.connector_config(1, 1, 0).pooled_tokens is True


def test_old_connector_json_keeps_its_shared_patch_scale() -> None:
    cfg = ConnectorConfig.load(OLD / "connector.json")
    assert cfg.kind == "qformer" and cfg.patch_scaling == "shared" and cfg.pooled_tokens is False
    # Written before pooled_tokens existed, an MLP connector reads as it was trained: not pooled.
    mlp = {k: v for k, v in cfg.to_dict().items() if k not in ("kind", "pooled_tokens")}
    assert ConnectorConfig.from_dict({**mlp, "kind": "mlp"}).pooled_tokens is False


def test_old_encoder_and_pretrain_configs_load(tmp_path: Path) -> None:
    encoder = TopoPackConfig.load(OLD / "encoder_config.json")
    assert encoder.patch_dim == 64 and encoder.n_layers == 6
    pretrain = PretrainConfig.load(OLD / "pretrain_config.json")
    assert pretrain == PretrainConfig()
    encoder.save(tmp_path / "encoder_config.json")
    assert TopoPackConfig.load(tmp_path / "encoder_config.json") == encoder


def test_unknown_keys_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "run.json"
    bad.write_text((OLD / "run.json").read_text().replace('"vocab_size"', '"vocab_sise"'))
    with pytest.raises(ConfigError, match=r"run\.json.*vocab_sise"):
        TuneConfig.load(bad)


def test_preprocess_manifest_settings_keep_their_keys() -> None:
    # Jobs read the manifest's "config" (and ask reads the fingerprint's grid/tissue): the keys stay as written before.
    from slidevl.features.config import PreprocessConfig
    from slidevl.slide.tissue import TissueParams
    from slidevl.tiling.grid import GridSpec

    config = PreprocessConfig(mpp_table={"a": 0.5, "b": 0.25}, shard=(1, 4), workers=3)
    saved = config.manifest_dict()
    assert list(saved) == ["grid", "tissue", "min_tissue", "encoder", "region_encoder", "device", "precision",
                           "mpp_override", "mpp_csv_slides", "pack_features", "global_feature", "float16",
                           "batch_size", "workers", "shard", "overwrite"]
    assert saved["mpp_csv_slides"] == 2 and saved["shard"] == [1, 4] and saved["workers"] == 3
    assert GridSpec.from_dict(saved["grid"]) == config.grid
    assert TissueParams.from_dict(saved["tissue"]) == config.tissue
    assert PreprocessConfig.from_dict(config.to_dict()) == config


def test_survival_run_identity_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run folder resumes only when the saved identity equals the new one: these are the identities
    # that CVConfig recorded before it derived from Config, for the same settings.
    from slidevl.survival.cohort import ClinicalColumns
    from slidevl.survival.cv import CVConfig

    monkeypatch.chdir(tmp_path)
    columns = {"id_col": "pathology_id", "patient_col": "patient_id", "time_col": "t", "event_col": "e",
               "event_is_censoring": False, "time_unit": "months"}
    common = {"seed": 0, "lr": 0.0002, "weight_decay": 1e-05, "alpha": 0.0, "n_bins": None, "bins_mode": "all",
              "variant": "full", "prompts": "synthetic", "text_encoder": "minilm", "region_tokens": "auto",
              "encoder": None, "skip_missing": False, "standardize": True, "evidence": True}
    tuned = CVConfig(features="feat", clinical="clin.csv", out="run", model="abmil", k=3, epochs=2, grad_accum=4,
                     model_options={"dim": 64}, columns=ClinicalColumns(id_col="slide", time_unit="days"),
                     max_cache_bytes=10, device="cpu")
    assert tuned.identity() == {
        "features": str(tmp_path / "feat"), "clinical": str(tmp_path / "clin.csv"), "model": "abmil", "splits": None,
        "k": 3, "epochs": 2, "grad_accum": 4, "model_options": {"dim": 64}, **common,
        "columns": {**columns, "id_col": "slide", "time_unit": "days"}}
    plain = CVConfig(features="feat", clinical="clin.csv", out="elsewhere", splits="sp")
    assert plain.identity() == {
        "features": str(tmp_path / "feat"), "clinical": str(tmp_path / "clin.csv"), "model": "hila",
        "splits": str(tmp_path / "sp"), "k": None, "epochs": 20, "grad_accum": None, "model_options": {}, **common,
        "columns": columns}
    assert CVConfig.from_dict(tuned.to_dict()) == tuned
