"""The user's preset -> path file and the ``encoders register/unregister/list`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.features.encoders import user_config
from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.cli import app
from slidevl.features.encoders.presets import PRESETS

runner = CliRunner()


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv(user_config.CONFIG_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def uni_dir(tmp_path: Path) -> Path:
    """A folder laid out as MahmoodLab/UNI ships it (the file's content is not read here)."""
    folder = tmp_path / "models" / "uni"
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"")
    return folder


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {name} "))


def test_config_file_follows_the_override_then_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(user_config.CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert user_config.config_file() == tmp_path / "home" / ".config" / "slidevl" / "encoders.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec says to ignore relative values
    assert user_config.config_file() == tmp_path / "home" / ".config" / "slidevl" / "encoders.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_config.config_file() == tmp_path / "xdg" / "slidevl" / "encoders.toml"
    monkeypatch.setenv(user_config.CONFIG_DIR_ENV, str(tmp_path / "mine"))
    assert user_config.config_file() == tmp_path / "mine" / "encoders.toml"


def test_register_list_unregister(config_dir: Path, uni_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert user_config.registered_paths() == {} and user_config.registered_path("uni") is None
    monkeypatch.chdir(uni_dir.parent)
    registered = runner.invoke(app, ["register", "UNI", "uni"])  # relative path, upper-case name
    assert registered.exit_code == 0, registered.output
    assert "uni -> " in registered.output and "--encoder uni" in registered.output
    assert user_config.registered_path("uni") == uni_dir  # stored absolute
    assert (config_dir / "encoders.toml").read_text() == f'[encoders]\nuni = "{uni_dir}"\n'

    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0, listed.output
    assert str(uni_dir) in _row(listed.output, "uni") and "1024" in _row(listed.output, "uni")
    assert _row(listed.output, "virchow2").rstrip(" │").endswith("—")
    for name in PRESETS:
        _row(listed.output, name)
    assert "handcrafted  (default)" in listed.output and "meanmax" in listed.output

    removed = runner.invoke(app, ["unregister", "uni"])
    assert removed.exit_code == 0 and str(uni_dir) in removed.output
    assert user_config.registered_path("uni") is None
    assert _row(runner.invoke(app, ["list"]).output, "uni").rstrip(" │").endswith("—")


def test_register_takes_the_weight_file_itself(config_dir: Path, uni_dir: Path) -> None:
    weights = uni_dir / "pytorch_model.bin"
    assert user_config.register("uni", weights) == weights
    assert user_config.registered_paths() == {"uni": weights}


def test_list_json_has_every_preset_record(config_dir: Path, uni_dir: Path) -> None:
    user_config.register("uni", uni_dir)
    listed = runner.invoke(app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    records = {record["name"]: record for record in data["presets"]}
    assert list(records) == list(PRESETS)
    assert records["uni"]["registered_path"] == str(uni_dir) and records["conch"]["registered_path"] is None
    assert records["virchow"]["feature_dim"] == 2560 and records["virchow"]["pooling"] == "cls+mean_patch"
    assert records["gigapath"]["magnification"] == 20.0 and records["gigapath"]["resize"] == 256
    assert data["config_file"] == str(config_dir / "encoders.toml")
    assert data["default_tile_encoder"] == "handcrafted" and "meanmax" in data["region_encoder_specs"]


def test_list_markdown_is_the_docs_table(config_dir: Path) -> None:
    listed = runner.invoke(app, ["list", "--markdown"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.strip().splitlines()
    assert lines[0].startswith("| spec | model (download from) |") and len(lines) == 2 + len(PRESETS)
    assert lines[2].startswith("| `uni` | [MahmoodLab/UNI](https://huggingface.co/MahmoodLab/UNI) |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    both = runner.invoke(app, ["list", "--json", "--markdown"])
    assert both.exit_code == 2 and "pass one of them" in both.output


def test_unknown_name_is_rejected_with_the_preset_names(config_dir: Path, uni_dir: Path) -> None:
    result = runner.invoke(app, ["register", "uni3", str(uni_dir)])
    assert result.exit_code == 2
    assert "'uni3' is not a preset name" in result.output and "uni2-h" in result.output and "phikon-v2" in result.output
    assert not (config_dir / "encoders.toml").exists()


def test_missing_path_and_folder_without_weights_are_rejected(config_dir: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["register", "virchow", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "paige-ai/Virchow" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = runner.invoke(app, ["register", "virchow", str(empty)])
    assert no_weights.exit_code == 2 and "holds no pytorch_model.bin" in no_weights.output
    assert not (config_dir / "encoders.toml").exists()


def test_unregister_of_an_unregistered_name_fails(config_dir: Path) -> None:
    result = runner.invoke(app, ["unregister", "conch"])
    assert result.exit_code == 2 and "'conch' is not registered" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[encoders\nuni = "/models/uni"\n', "is not valid TOML"),
        ("encoders = 3\n", "'encoders' must be a table"),
        ("[encoders]\nuni = 3\n", "not path strings"),
    ],
)
def test_malformed_file_names_the_file_and_the_fix(config_dir: Path, uni_dir: Path, text: str, message: str) -> None:
    file = config_dir / "encoders.toml"
    file.parent.mkdir(parents=True)
    file.write_text(text)
    with pytest.raises(EncoderError, match=message) as caught:
        user_config.registered_path("uni")
    assert str(file) in str(caught.value)
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 2 and str(file) in listed.output and message in listed.output
    assert runner.invoke(app, ["register", "uni", str(uni_dir)]).exit_code == 2
    assert file.read_text() == text  # a failed register leaves the user's file alone


def test_hand_written_entries_and_other_tables_survive_a_write(config_dir: Path, uni_dir: Path) -> None:
    file = config_dir / "encoders.toml"
    file.parent.mkdir(parents=True)
    file.write_text('[other]\nkeep = true\n\n[encoders]\nCONCH = "/models/conch"\nunknown-model = "/x"\n')
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "unknown-model" in listed.output and "not a preset" in listed.output
    user_config.register("uni", uni_dir)
    assert user_config.unregister("conch") == Path("/models/conch")  # found whatever its case
    assert user_config.registered_paths() == {"unknown-model": Path("/x"), "uni": uni_dir}
    assert "[other]\nkeep = true" in file.read_text()
    assert not list(config_dir.glob("*.partial"))


def test_hand_written_relative_and_home_paths(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_dir.mkdir()
    (config_dir / "encoders.toml").write_text('[encoders]\nuni = "models/uni"\nconch = "~/conch"\n')
    assert user_config.registered_path("uni") == config_dir / "models" / "uni"
    assert user_config.registered_path("CONCH") == tmp_path / "home" / "conch"
