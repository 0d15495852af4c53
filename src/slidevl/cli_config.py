"""Command-line options generated from config fields, so the CLI and the API cannot drift.

:func:`config_options` turns a :class:`~slidevl.config.Config` dataclass into typer
options, one per field (nested configs flattened: ``TrainSettings.epochs`` becomes
``--epochs``), with the field's default and its ``help`` metadata. A command declares
the config it builds::

    @app.command("stage2")
    @options_from(TuneConfig, exclude=("stage",))
    def stage2(config: TuneConfig, resume: Annotated[bool, typer.Option("--resume")] = False):
        ...

and receives a validated config; its own extra parameters (``resume``) stay as they
are. ``--recipe FILE`` is added to every such command: a YAML/JSON file of settings
that the options given on the command line override.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional

import typer

from slidevl.config import Config, flatten, is_config_class, optional_inner, read_mapping
from slidevl.errors import ConfigError

#: Parameter name of the recipe option added to every config-built command.
RECIPE_PARAM = "recipe"
#: Parameter through which typer hands the command its context (to tell typed values from defaults).
_CTX_PARAM = "slidevl_cli_context"


@dataclass(frozen=True)
class ConfigOption:
    """One generated option: where it lives in the config, and how it is spelt."""

    key: str  # dotted path in the config, e.g. "train.epochs"
    param: str  # the Python parameter name typer sees
    flag: str  # the option as typed, e.g. "--epochs" or "--shuffle/--no-shuffle"
    annotation: Any
    default: Any
    required: bool


def config_options(cls: type[Config], *, exclude: Iterable[str] = (), prefix: str = "") -> list[ConfigOption]:
    """The options of ``cls``'s fields (nested configs flattened), in field order.

    ``exclude`` names dotted keys (or whole groups) to leave out. Two fields that would
    get the same flag are a programming error, reported at import time.
    """
    skip = set(exclude)
    options: list[ConfigOption] = []
    hints = typing.get_type_hints(cls, include_extras=False)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}{f.name}"
        meta = f.metadata
        if key in skip or meta.get("cli") is False:
            continue
        kind = hints[f.name]
        if is_config_class(optional_inner(kind)):
            options += config_options(optional_inner(kind), exclude=skip, prefix=f"{key}.")
            continue
        default, required = _default(f)
        name = (meta.get("flag") or f"--{f.name.replace('_', '-')}")
        flag = f"{name}/--no-{name[2:]}" if optional_inner(kind) is bool else name
        help_text = meta.get("help") or ""
        option = typer.Option(flag, help=help_text, show_default=not required, **meta.get("constraints", {}))
        options.append(ConfigOption(key, key.replace(".", "__"), flag, Annotated[kind, option], default, required))
    flags = [o.flag.split("/")[0] for o in options]
    clashes = sorted({f for f in flags if flags.count(f) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: options {clashes} come from more than one field; give them flag=... names")
    return options


def build_config(cls: type[Config], given: dict[str, Any], recipe: Path | None = None) -> Config:
    """``cls`` from a recipe file (optional) overridden by the CLI values in ``given`` (dotted keys)."""
    base = read_mapping(recipe) if recipe is not None else {}
    merged = flatten(base)
    merged.update(given)
    nested: dict[str, Any] = {}
    for key, value in merged.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cls.from_dict(nested, source=str(recipe) if recipe else None)


def options_from(cls: type[Config], *, exclude: Iterable[str] = (), fixed: Mapping[str, Any] | None = None,
                 recipe_help: str = "YAML/JSON file of settings (e.g. recipes/*.yaml); options given here override it.",
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command ``f(config, **extra)`` so typer sees ``cls``'s fields as options.

    Values the user did not type are not passed on, so a ``--recipe`` value wins over a
    field default and an explicit option wins over the recipe. ``fixed`` holds dotted keys
    the command itself sets (``{"stage": "stage1"}``); they are not options and win over both.
    ``recipe_help`` says what the ``--recipe`` file holds when the config is part of a command's settings.
    """
    options = config_options(cls, exclude=(*exclude, *(fixed or {})))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(func, eval_str=True)
        first, *extra = own.parameters.values()
        recipe = inspect.Parameter(
            RECIPE_PARAM, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--recipe", help=recipe_help, exists=True, dir_okay=False)],
        )
        generated = [
            inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY,
                              default=inspect.Parameter.empty if o.required else o.default, annotation=o.annotation)
            for o in options
        ]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                  and p.default is not inspect.Parameter.empty else p for p in extra]
        positional = [p for p in params if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in params if p not in positional]

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.pop(_CTX_PARAM)
            recipe_file = kwargs.pop(RECIPE_PARAM)
            given = {}
            for o in options:
                value = kwargs.pop(o.param)
                if _typed(ctx, o.param) or recipe_file is None:
                    given[o.key] = value
            given.update(fixed or {})
            try:
                config = build_config(cls, given, recipe_file)
            except ConfigError as exc:
                raise typer.BadParameter(str(exc)) from None
            return func(config, *args, **kwargs)

        context = inspect.Parameter(_CTX_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        signature = own.replace(parameters=positional + generated + [recipe] + keyword + [context])
        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        command.slidevl_config = (cls, options)  # type: ignore[attr-defined]  # read by the CLI-defaults test
        return command

    return decorate


def field_option(cls: type[Config], name: str, *flags: str, **extra: Any) -> Any:
    """A typer option for a hand-written parameter that stands for ``cls``'s field ``name``.

    For commands whose parameters are not all config fields one to one: the option's
    default, help and constraints are the field's, so they are not restated.
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]  # type: ignore[arg-type]
    default, required = _default(f)
    return typer.Option(... if required else default, *flags, help=f.metadata.get("help") or "",
                        **{**f.metadata.get("constraints", {}), **extra})


def _typed(ctx: typer.Context, param: str) -> bool:
    """Whether the user gave ``param`` on the command line (or its environment variable), not its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _default(f: dataclasses.Field) -> tuple[Any, bool]:
    if f.default is not dataclasses.MISSING:
        return f.default, False
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory(), False  # type: ignore[misc]
    return None, True
