"""The user's own map from preset names to the weights they downloaded.

``slidevl encoders register uni /models/uni`` writes ``uni = "/models/uni"`` under the
``[encoders]`` table of ``encoders.toml`` in the user's config folder, so that
``--encoder uni`` alone finds the weights afterwards. The folder is, first that is set:

* ``$SLIDEVL_CONFIG_DIR`` (one switch for tests, containers and shared installs);
* ``$XDG_CONFIG_HOME/slidevl`` (only an absolute value counts, as the XDG spec says);
* ``~/.config/slidevl``.

The file is plain TOML and may be edited by hand; writes go through
:mod:`slidevl.atomic`, so a killed ``register`` never leaves half a file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import tomli_w

from slidevl.atomic import write_bytes_atomic
from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.presets import PRESETS, preset_names
from slidevl.features.encoders.weights import find_weight_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # the package supports 3.10, whose standard library has no TOML reader
    import tomli as tomllib

CONFIG_DIR_ENV = "SLIDEVL_CONFIG_DIR"
FILE_NAME = "encoders.toml"
TABLE = "encoders"


def config_file() -> Path:
    """Where the registered paths live (the file need not exist yet)."""
    override = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser() / FILE_NAME
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "slidevl" / FILE_NAME


def registered_paths() -> dict[str, Path]:
    """Every ``name = path`` entry of the file, in file order; empty when there is no file.

    Names that are no preset (a typo made by hand, a preset since renamed) are kept, so
    ``slidevl encoders list`` can point them out and ``unregister`` can remove them.
    ``register`` writes absolute paths; a hand-written ``~/models/uni`` is expanded and a
    relative one is taken from the file's folder, not from wherever a command runs.
    """
    file = config_file()
    entries = _table_of(_read_document(file), file)
    return {_key(name): file.parent / Path(value).expanduser() for name, value in entries.items()}


def registered_path(name: str) -> Path | None:
    """The path registered for preset ``name``, or ``None`` when it has none."""
    return registered_paths().get(_key(name))


def register(name: str, path: str | os.PathLike[str]) -> Path:
    """Record ``path`` as the weights of preset ``name``; return the absolute path stored.

    The path must exist and hold the preset's weights as the loader will look for them
    (the folder as the hub ships it, a Hugging Face cache folder, or the weight file),
    so a wrong folder fails now rather than at the first ``preprocess``.
    """
    name = _key(name)
    preset = PRESETS.get(name)
    if preset is None:
        raise EncoderError(f"{name!r} is not a preset name; choose one of {', '.join(preset_names())}")
    # abspath, not resolve(): a symlink such as /models/uni-current -> uni-2024 should be
    # stored as typed, so repointing the link switches the weights.
    stored = Path(os.path.abspath(Path(path).expanduser()))
    if not stored.exists():
        raise EncoderError(f"{name}: {stored} does not exist; pass the folder you downloaded {preset.hub_repo} into")
    find_weight_file(stored, name, preset.weight_files)
    file = config_file()
    document = _read_document(file)
    # Drop a hand-written "UNI = ..." too, so one entry is left for the name.
    table = {key: value for key, value in _table_of(document, file).items() if _key(key) != name}
    table[name] = str(stored)
    _write_document(file, {**document, TABLE: table})
    return stored


def unregister(name: str) -> Path:
    """Remove ``name`` from the file; return the path it had."""
    file = config_file()
    document = _read_document(file)
    table = dict(_table_of(document, file))
    keys = [key for key in table if _key(key) == _key(name)]
    if not keys:
        have = ", ".join(table) or "none"
        raise EncoderError(f"{name!r} is not registered in {file} (registered: {have})")
    removed = Path(table[keys[-1]])
    for key in keys:
        del table[key]
    _write_document(file, {**document, TABLE: table})
    return removed


def _key(name: str) -> str:
    # Preset names are lower case and specs match them case-insensitively; so does the
    # file, where a hand-written "UNI = ..." is as good as "uni = ...".
    return name.strip().lower()


def _read_document(file: Path) -> dict[str, Any]:
    if not file.exists():
        return {}
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise EncoderError(
            f"{file} is not valid TOML ({exc}); fix it by hand (e.g. [{TABLE}] then uni = \"/models/uni\") "
            "or delete it and register the paths again with `slidevl encoders register NAME PATH`"
        ) from exc
    except OSError as exc:
        raise EncoderError(f"{file} could not be read ({exc}); check its permissions or set ${CONFIG_DIR_ENV}") from exc


def _table_of(document: dict[str, Any], file: Path) -> dict[str, str]:
    table = document.get(TABLE, {})
    if not isinstance(table, dict):
        raise EncoderError(
            f"{file}: '{TABLE}' must be a table ([{TABLE}] then name = \"path\" lines); fix or delete the file"
        )
    bad = [name for name, value in table.items() if not isinstance(value, str)]
    if bad:
        raise EncoderError(
            f"{file}: the entries {', '.join(bad)} of [{TABLE}] are not path strings; write them as "
            f"{bad[0]} = \"/path/to/weights\" or remove them"
        )
    return table


def _write_document(file: Path, document: dict[str, Any]) -> None:
    # tomli_w drops comments a user wrote by hand; the entries themselves all survive, and
    # other tables are written back unchanged.
    write_bytes_atomic(file, tomli_w.dumps(document).encode("utf-8"))
