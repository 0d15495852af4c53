"""One config model for every part of the toolkit.

Every settings class is a dataclass that derives from :class:`Config`. The base gives
them all the same small vocabulary, after Hugging Face's ``PretrainedConfig``:

* :meth:`Config.to_dict` / :meth:`Config.from_dict` — plain JSON-ready dicts; nested
  configs become nested dicts and come back as their classes; an unknown key is an
  error that names it (a typo in a recipe must not be silently ignored);
* :meth:`Config.save` / :meth:`Config.load` — one file, JSON or YAML by its suffix;
* :meth:`Config.save_pretrained` / :meth:`Config.from_pretrained` — ``config.json`` in a
  checkpoint folder, tagged with the class that wrote it;
* :meth:`Config.differences` — what changed between two configs, for ``--resume``;
* :meth:`Config.with_overrides` — a copy with dotted-key overrides (``train.epochs``).

Field documentation lives next to the field, as ``field(metadata={"help": ...})`` (see
:func:`setting`), so the command line (:mod:`slidevl.cli_config`) and the docs read the
same text and the same default as the Python API.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar, Union

from slidevl.atomic import write_json_atomic, write_text_atomic
from slidevl.errors import ConfigError

C = TypeVar("C", bound="Config")

CONFIG_NAME = "config.json"
CLASS_KEY = "config_class"


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            flag: str | None = None, cli: bool = True, **constraints: Any) -> Any:
    """A dataclass field with its help text (and CLI flag/constraints) attached.

    ``flag`` overrides the generated ``--field-name`` option name; ``cli=False`` keeps a
    field out of the command line (set from code or a recipe only); ``constraints`` are
    passed to the CLI option (``min=1``, ``max=...``).
    """
    metadata = {"help": help, "flag": flag, "cli": cli, "constraints": constraints}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """Base of every settings dataclass (subclasses are decorated with ``@dataclass``)."""

    #: The file name used by :meth:`save_pretrained` / :meth:`from_pretrained`.
    config_name: ClassVar[str] = CONFIG_NAME

    # -- plain dicts ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values: nested configs as dicts, paths as strings."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str | None = None) -> C:
        """Build the config from a dict; nested configs are built from nested dicts.

        Unknown keys raise :class:`~slidevl.errors.ConfigError` naming them, the known
        ones, and ``source`` (the file they came from) when given.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{_where(source)}{cls.__name__} settings must be a mapping, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != CLASS_KEY}
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{_where(source)}unknown {cls.__name__} setting(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            try:
                values[name] = _coerce(hints[name], value)
            except ConfigError as exc:
                raise ConfigError(f"{_where(source)}{cls.__name__}.{name}: {exc}") from None
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{_where(source)}{exc}") from None

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | Path, *, tagged: bool = False) -> Path:
        """Write the config to ``path`` atomically: YAML for ``.yaml``/``.yml``, else JSON.

        ``tagged`` adds the class name (``config_class``), as :meth:`save_pretrained` does.
        """
        path = Path(path)
        data = {CLASS_KEY: type(self).__name__, **self.to_dict()} if tagged else self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
        return write_json_atomic(path, data)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a config written by :meth:`save` (or by hand: a recipe)."""
        return cls.from_dict(read_mapping(path), source=str(path))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``<folder>/config.json`` (tagged with the class name) and return its path."""
        return self.save(Path(folder) / self.config_name, tagged=True)

    @classmethod
    def from_pretrained(cls: type[C], folder: str | Path) -> C:
        """Read ``<folder>/config.json`` (or the file itself) written by :meth:`save_pretrained`."""
        path = Path(folder)
        if path.is_dir():
            path = path / cls.config_name
        if not path.is_file():
            raise ConfigError(f"{path} not found: {folder} is not a saved {cls.__name__} folder")
        data = read_mapping(path)
        saved = data.get(CLASS_KEY)
        if saved is not None and saved != cls.__name__:
            raise ConfigError(f"{path} holds a {saved}, not a {cls.__name__}: pass the folder of the right kind of checkpoint")
        return cls.from_dict(data, source=str(path))

    # -- comparisons and edits -----------------------------------------------------------
    def differences(self, other: "Config") -> list[str]:
        """``"key: was X, now Y"`` for every dotted key that differs (used by ``--resume``)."""
        a, b = flatten(self.to_dict()), flatten(other.to_dict())
        return [f"{k}: was {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def with_overrides(self: C, overrides: Mapping[str, Any], *, source: str | None = None) -> C:
        """A copy with dotted-key overrides applied (``{"train.epochs": 3}``), validated again."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{_where(source)}{key!r}: {part!r} is not a group of settings in {type(self).__name__}")
                node = node[part]
            node[leaf] = _plain(value)
        return type(self).from_dict(data, source=source)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML file's top-level mapping, with an error that names the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    yaml_file = path.suffix in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError, which derives from Exception only
        raise ConfigError(f"{path} is not valid {'YAML' if yaml_file else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_config_class(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Config) and dataclasses.is_dataclass(kind)


def optional_inner(kind: Any) -> Any:
    """``X`` for ``Optional[X]`` / ``X | None``; ``kind`` itself otherwise."""
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(kind: Any, value: Any) -> Any:
    """``value`` (from JSON/YAML/CLI) as the field's declared type, where the two differ."""
    if value is None:
        return None
    inner = optional_inner(kind)
    # Nested configs are built without the source: the caller's message names the file once.
    if is_config_class(inner):
        if isinstance(inner, type) and isinstance(value, inner):
            return value
        return inner.from_dict(value)
    if inner is Path:
        return Path(value)
    origin = typing.get_origin(inner)
    if (inner is tuple or origin is tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(inner)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if is_config_class(item):  # a variable-length tuple of configs, e.g. tuple[WindowSpec, ...]
            return tuple(v if isinstance(v, item) else item.from_dict(v) for v in value)
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
