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


def test_old_connector_json_keeps_its_shared_patch_scale() -> None:
    cfg = ConnectorConfig.load(OLD / "connector.json")
    assert cfg.kind == "qformer" and cfg.patch_scaling == "shared" and cfg.pooled_tokens is False


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
