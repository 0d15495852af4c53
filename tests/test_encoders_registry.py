"""The tile-encoder registry and the ``encoders`` CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.features.encoders import DEFAULT_ENCODER, EncoderError, HandcraftedEncoder, available_encoders, get_encoder
from slidevl.features.encoders.cli import app


def test_default_is_handcrafted_with_a_safe_store_name() -> None:
    enc = get_encoder()
    assert isinstance(enc, HandcraftedEncoder) and DEFAULT_ENCODER == "handcrafted"
    assert enc.name == "handcrafted" and enc.input_size == 256
    assert isinstance(get_encoder(" handcrafted ", device="cuda"), HandcraftedEncoder)  # no model, no device needed


def test_available_encoders_lists_every_form() -> None:
    forms = available_encoders()
    assert forms[0] == "handcrafted"
    assert any(f.startswith("hf:") for f in forms) and any(f.startswith("openclip:") for f in forms)


@pytest.mark.parametrize("spec", ["resnet50", "hf", "timm:/models/x", ""])
def test_unknown_specs_list_the_valid_forms(spec: str) -> None:
    with pytest.raises(EncoderError, match="valid forms are handcrafted, hf:.*, NAME:"):
        get_encoder(spec)


def test_spec_without_path_is_rejected() -> None:
    with pytest.raises(EncoderError, match="names no path; e.g. hf:/models/my-model"):
        get_encoder("hf:  ")


def test_cli_list_and_info(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "handcrafted  (default)" in listed.output and "meanmax" in listed.output
    info = runner.invoke(app, ["info", "handcrafted"])
    assert info.exit_code == 0
    prov = json.loads(info.output)
    assert prov["name"] == "handcrafted" and len(prov["feature_names"]) == prov["feature_dim"]
    region = runner.invoke(app, ["info", "meanmax", "--region"])
    assert region.exit_code == 0 and json.loads(region.output)["name"] == "meanmax"
    bad = runner.invoke(app, ["info", f"hf:{tmp_path / 'missing'}"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
