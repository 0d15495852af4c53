"""The config base and the options generated from it: round trips, strict keys, recipes, CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import typer
import yaml
from typer.testing import CliRunner

from slidevl.cli_config import options_from
from slidevl.config import Config, setting
from slidevl.errors import ConfigError, InputError, SlideVLError


@dataclass
class _Train(Config):
    epochs: int = setting(3, help="Passes over the data.", min=1)
    lr: Optional[float] = setting(None, help="Peak learning rate.")
    bf16: bool = setting(False, help="bf16 mixed precision.")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class _Run(Config):
    out: Path = setting(help="Run folder.")
    kind: Literal["a", "b"] = setting("a", help="Which variant.")
    sizes: tuple = setting((1, 2), help="Sizes.", cli=False)
    train: _Train = setting(default_factory=_Train, help="Optimisation.")


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command("go")
    @options_from(_Run)
    def go(config: _Run, resume: Annotated[bool, typer.Option("--resume")] = False) -> None:
        typer.echo(f"{config.to_dict()} resume={resume}")

    @app.command("noop")
    def noop() -> None:
        pass

    return app


def test_round_trip_through_dict_json_yaml_and_folder(tmp_path: Path) -> None:
    run = _Run(out=Path("runs/x"), kind="b", sizes=(3, 4), train=_Train(epochs=5, lr=0.1))
    assert _Run.from_dict(run.to_dict()) == run
    for name in ("c.json", "c.yaml"):
        run.save(tmp_path / name)
        assert _Run.load(tmp_path / name) == run
    run.save_pretrained(tmp_path / "ckpt")
    assert _Run.from_pretrained(tmp_path / "ckpt") == run


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"train": {"epoch": 2}}))
    with pytest.raises(ConfigError, match=r"r\.yaml.*unknown _Train setting\(s\) \['epoch'\]") as info:
        _Run.load(tmp_path / "r.yaml")
    # A nested group's error names the file once, and the group it is in.
    assert str(info.value).count("r.yaml") == 1 and "_Run.train: " in str(info.value)


def test_validation_errors_become_config_errors_with_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochs must be >= 1") as info:
        _Run.from_dict({"out": "x", "train": {"epochs": 0}}, source="recipe.yaml")
    assert str(info.value).count("recipe.yaml") == 1
    assert isinstance(info.value, InputError) and isinstance(info.value, SlideVLError) and info.value.exit_code == 2


def test_from_pretrained_refuses_another_kind_of_folder(tmp_path: Path) -> None:
    _Run(out=Path("x")).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a _Run, not a _Train"):
        _Train.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a saved _Train folder"):
        _Train.from_pretrained(tmp_path / "missing")


def test_overrides_and_differences() -> None:
    run = _Run(out=Path("x"))
    changed = run.with_overrides({"train.epochs": 9, "kind": "b"})
    assert changed.train.epochs == 9 and changed.kind == "b"
    assert run.differences(changed) == ["kind: was 'a', now 'b'", "train.epochs: was 3, now 9"]
    with pytest.raises(ConfigError, match="'out' is not a group"):
        run.with_overrides({"out.x": 1})


def test_generated_options_carry_the_config_defaults_and_help() -> None:
    result = CliRunner().invoke(_app(), ["go", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--epochs", "Passes over the data.", "--bf16", "--no-bf16", "--kind", "--recipe", "--resume"):
        assert text in result.output
    assert "--sizes" not in result.output  # cli=False keeps it for code and recipes only
    result = CliRunner().invoke(_app(), ["go", "--out", "o", "--epochs", "5", "--bf16", "--resume"])
    assert result.exit_code == 0, result.output
    assert "'epochs': 5" in result.output and "'bf16': True" in result.output and "resume=True" in result.output
    assert "'kind': 'a'" in result.output and "'lr': None" in result.output


def test_recipe_values_apply_and_typed_options_override_them(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "b", "train": {"epochs": 7, "lr": 0.1}}))
    result = CliRunner().invoke(_app(), ["go", "--out", "o", "--recipe", str(recipe), "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    assert "'kind': 'b'" in result.output and "'epochs': 7" in result.output and "'lr': 0.5" in result.output


def test_a_bad_recipe_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"knd": "b"}))
    result = CliRunner().invoke(_app(), ["go", "--out", "o", "--recipe", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "knd" in result.output


def test_a_tuple_of_configs_comes_back_as_configs(tmp_path: Path) -> None:
    from slidevl.vqa.build import BuildConfig
    from slidevl.vqa.windows import WindowSpec

    config = BuildConfig(train_extra_k=(8, 12), windows=(WindowSpec.parse("5x:256"), WindowSpec.parse("0.25um:128")))
    config.save(tmp_path / "build.yaml")
    back = BuildConfig.load(tmp_path / "build.yaml")
    assert back == config and isinstance(back.windows[1], WindowSpec)
    with pytest.raises(ConfigError, match=r"build\.json.*WindowSpec.*size"):
        (tmp_path / "build.json").write_text('{"windows": [{"name": "5x", "mpp": 2.0, "size": 256}]}')
        BuildConfig.load(tmp_path / "build.json")
