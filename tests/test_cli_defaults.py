"""Every CLI default is the Python default, and every recipe file loads.

The commands built by :func:`slidevl.cli_config.options_from` carry
``callback.slidevl_config = (ConfigClass, options)``: each generated option's default must
be its config field's default. Hand-written options that mirror a Python function's
parameter (same name) must have that parameter's default.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import typer

from slidevl.cli import app
from slidevl.config import Config, read_mapping

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _walk(command: Any, ctx: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    # Groups are told apart by behaviour: typer may ship its own copy of click's classes.
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):  # the top level imports each command on get_command
            sub = command.get_command(ctx, name)
            if sub is not None:
                yield from _walk(sub, sub.context_class(sub, parent=ctx, info_name=name), (*path, name))
    else:
        yield path, command


def _commands() -> list[tuple[tuple[str, ...], Any]]:
    root = typer.main.get_command(app)
    return list(_walk(root, root.context_class(root, info_name="slidevl")))


def _config_of(command: Any) -> Any:
    # typer hands click a wrapper of the command function; the function itself carries the marker.
    callback = command.callback
    return getattr(callback, "slidevl_config", None) or getattr(getattr(callback, "__wrapped__", None), "slidevl_config", None)


COMMANDS = _commands()
CONFIG_COMMANDS = [(p, c) for p, c in COMMANDS if _config_of(c) is not None]


def _field_default(cls: type[Config], key: str) -> Any:
    """The Python default of dotted ``key`` in ``cls`` (nested configs via their own defaults)."""
    value: Any = cls
    for part in key.split("."):
        if isinstance(value, type):
            f = {f.name: f for f in dataclasses.fields(value)}[part]
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                return None  # a required field: no default on either side
        else:
            value = getattr(value, part)
    return value


def test_the_tuning_commands_are_built_from_their_config() -> None:
    names = {" ".join(p) for p, _ in CONFIG_COMMANDS}
    assert {"slidellm warmup", "slidellm represent", "slidellm stage1", "slidellm stage2", "preprocess", "survival cv",
            "encoders train-clip"} <= names


#: Commands that declare part of their options by hand, each for the config field of the same name.
def _field_mirrors() -> dict[str, tuple[type[Config], ...]]:
    from slidevl.features.config import PreprocessConfig
    from slidevl.survival.cohort import ClinicalColumns
    from slidevl.tiling.grid import GridSpec
    from slidevl.vqa.build import BuildConfig

    return {"preprocess": (PreprocessConfig, GridSpec), "vqa build": (BuildConfig,), "survival bins": (ClinicalColumns,)}


@pytest.mark.parametrize("name", sorted(_field_mirrors()))
def test_hand_written_options_default_to_their_config_fields(name: str) -> None:
    command = dict((" ".join(p), c) for p, c in COMMANDS)[name]
    fields = {f.name: cls for cls in reversed(_field_mirrors()[name]) for f in dataclasses.fields(cls)}
    shared = [p for p in command.params if p.name in fields]
    assert len(shared) >= 6, [p.name for p in shared]
    for param in shared:
        cls = fields[param.name]
        expected = _field_default(cls, param.name)
        assert param.default == expected, f"{name} --{param.name}: CLI {param.default!r} != {cls.__name__} {expected!r}"


def test_preprocess_generates_its_tissue_options() -> None:
    command = dict((" ".join(p), c) for p, c in COMMANDS)["preprocess"]
    assert _config_of(command)[0].__name__ == "TissueParams"
    flags = {opt for p in command.params for opt in p.opts}
    assert {"--seg-downsample", "--seg-level", "--min-object-um2", "--max-hole-um2", "--adipose-radius-um"} <= flags


#: Hand-written commands whose options mirror a Python function's parameters of the same name.
def _mirrors() -> dict[str, Callable[..., Any]]:
    from slidevl.vqa.predict import predict_records

    return {"vqa predict": predict_records}


@pytest.mark.parametrize("name", sorted(_mirrors()))
def test_hand_written_options_default_to_the_function_defaults(name: str) -> None:
    command = dict((" ".join(p), c) for p, c in COMMANDS)[name]
    function = _mirrors()[name]
    signature = inspect.signature(function).parameters
    shared = [p for p in command.params if p.name in signature and signature[p.name].default is not inspect.Parameter.empty]
    assert shared, f"{name} shares no option with {function.__name__}"
    for param in shared:
        assert param.default == signature[param.name].default, (
            f"{name} --{param.name}: CLI {param.default!r} != {function.__name__} {signature[param.name].default!r}")


def test_stage_defaults_are_the_recipe_schedule() -> None:
    from slidevl.slidellm.recipe import RecipeSizes
    from slidevl.slidellm.tuning.config import STAGE_DEFAULTS, TuneConfig

    recipe = RecipeSizes()
    for stage, epochs in (("warmup", recipe.warmup_epochs), ("stage1", recipe.stage1_epochs), ("stage2", recipe.stage2_epochs)):
        assert STAGE_DEFAULTS[stage]["epochs"] == epochs
        train = TuneConfig(stage=stage, records="r", out="o").train
        assert train.epochs == epochs
    assert STAGE_DEFAULTS["stage1"]["batch_size"] == STAGE_DEFAULTS["stage2"]["batch_size"] == recipe.batch_size


def test_vqa_recipe_file_is_the_default_config() -> None:
    from slidevl.slidellm.connector import ConnectorConfig
    from slidevl.slidellm.recipe import RecipeSizes

    assert RecipeSizes.load(RECIPES / "vqa.yaml") == RecipeSizes()
    connector = ConnectorConfig(vision_dim=1, llm_dim=1, **RecipeSizes().connector.given())
    assert connector.kind == "mlp" and connector.pooled_tokens  # the measured best connector


def test_demo_recipe_file_is_what_the_demo_trains() -> None:
    from slidevl.demo import DEMO_RECIPE
    from slidevl.slidellm.recipe import RecipeSizes

    assert RecipeSizes.load(RECIPES / "demo.yaml") == RecipeSizes(**DEMO_RECIPE)


def test_qformer_recipe_builds_a_qformer() -> None:
    from slidevl.slidellm.connector import ConnectorConfig
    from slidevl.slidellm.recipe import RecipeSizes

    recipe = RecipeSizes.load(RECIPES / "qformer.yaml")
    config = ConnectorConfig(vision_dim=1, llm_dim=1, **recipe.connector.given())
    assert config.kind == "qformer" and not config.pooled_tokens


def test_survival_recipe_mirrors_the_cv_defaults() -> None:
    from slidevl.survival.cv import CVConfig
    from slidevl.survival.validate import auto_grad_accum

    data = read_mapping(RECIPES / "survival.yaml")
    defaults = {f.name: f.default for f in dataclasses.fields(CVConfig) if f.default is not dataclasses.MISSING}
    assert data and set(data) <= set(defaults)
    assert {k: defaults[k] for k in data} == data
    # grad_accum left unset follows the stated rule: at least 32 optimizer steps per epoch, at most 32 patients each.
    assert data["grad_accum"] is None
    assert [auto_grad_accum(n) for n in (24, 100, 1000, 5000)] == [1, 3, 31, 32]


def test_every_recipe_file_loads() -> None:
    files = sorted(RECIPES.glob("*.yaml"))
    assert {f.name for f in files} >= {"vqa.yaml", "demo.yaml", "qformer.yaml", "survival.yaml"}
    for path in files:
        assert read_mapping(path), path
