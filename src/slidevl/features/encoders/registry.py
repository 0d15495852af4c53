"""Build tile encoders from spec strings, through two registries.

Specs:

* ``handcrafted`` (the default): stain, nuclear, texture and colour statistics, no weights;
* ``NAME:PATH`` for a named foundation model (:data:`.presets.PRESETS`: ``uni``,
  ``conch``, ``virchow2``, ...), PATH being the folder as the hub ships it or the weight
  file; ``NAME`` alone once ``slidevl encoders register NAME PATH`` recorded its path;
* ``hf:/local/dir``: any ``transformers`` vision model saved with ``save_pretrained``;
* ``openclip:/local/dir`` or ``openclip:ARCH@/local/checkpoint``: an open_clip image tower.

:data:`ENCODERS` maps a spec kind (the part before the colon: ``handcrafted``, ``hf``,
``openclip``) to its builder; :data:`PRESET_LIBRARIES` maps a preset's ``library``
(``timm``, ``transformers``, ``conch``) to the builder that makes any preset of that
library. A new kind or library is one decorated function here; a new preset of a known
library is one :class:`~.presets.EncoderPreset` record (``docs/adding-a-model.md``).

Model weights are only ever read from local paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slidevl.features.encoders.base import EncoderError, TileEncoder
from slidevl.features.encoders.handcrafted import HandcraftedEncoder
from slidevl.features.encoders.hf import HFEncoder
from slidevl.features.encoders.openclip import OpenCLIPEncoder
from slidevl.features.encoders.presets import PRESETS, EncoderPreset, preset_for_spec, preset_names
from slidevl.registry import Registry

DEFAULT_ENCODER = "handcrafted"
PRESET_FORM = "NAME:/path/to/weights (a preset, see `slidevl encoders list`)"

#: ``build(path, device)``: the text after the colon (stripped; empty for kinds without a path) and the device.
EncoderBuilder = Callable[[str, str], TileEncoder]
#: ``build(preset, weight_path, device)`` for every preset of one library.
PresetBuilder = Callable[[EncoderPreset, Path, str], TileEncoder]


@dataclass(frozen=True)
class EncoderKind:
    """One spec kind: its builder and, for kinds that load a model, what the path after the colon is."""

    build: EncoderBuilder
    path_hint: str | None = None

    @property
    def takes_path(self) -> bool:
        return self.path_hint is not None


ENCODERS: Registry[EncoderKind] = Registry("tile encoder kind")
PRESET_LIBRARIES: Registry[PresetBuilder] = Registry("preset library")


def encoder_kind(name: str, *, path: str | None = None,
                 registry: Registry[EncoderKind] = ENCODERS) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator registering ``build(path, device)`` as spec kind ``name`` (``NAME:PATH`` when ``path`` hints one)."""

    def add(build: EncoderBuilder) -> EncoderBuilder:
        registry.register(name)(EncoderKind(build, path))
        return build

    return add


def parse_spec(kinds: Registry[EncoderKind], spec: str) -> tuple[EncoderKind, str] | None:
    """The registered kind a ``KIND`` or ``KIND:PATH`` spec names and its path; None when no kind matches."""
    kind_name, sep, rest = spec.strip().partition(":")
    kind = kinds.get(kind_name) if kind_name in kinds else None
    if kind is None or kind.takes_path != bool(sep):
        return None
    if kind.takes_path and not rest.strip():
        raise EncoderError(f"encoder spec {spec!r} names no path; e.g. {kind_name}:/models/my-model")
    return kind, rest.strip()


def spec_forms(kinds: Registry[EncoderKind]) -> list[str]:
    """The spec forms of every kind of ``kinds`` (paths as placeholders)."""
    return [name if kind.path_hint is None else f"{name}:{kind.path_hint}" for name, kind in kinds.items()]


@encoder_kind("handcrafted")
def _handcrafted(path: str, device: str) -> TileEncoder:
    # Pure numpy in the workers: the device does not apply.
    return HandcraftedEncoder()


@encoder_kind("hf", path="/path/to/model_dir")
def _hf(path: str, device: str) -> TileEncoder:
    return HFEncoder(path, device=device)


@encoder_kind("openclip", path="/path/to/dir_or_ARCH@checkpoint")
def _openclip(path: str, device: str) -> TileEncoder:
    return OpenCLIPEncoder(path, device=device)


# The preset builders import their library's encoder module when first used, so that
# listing or building other encoders never pays for it.
@PRESET_LIBRARIES.register("timm")
def _timm_preset(preset: EncoderPreset, path: Path, device: str) -> TileEncoder:
    from slidevl.features.encoders.timm_presets import TimmPresetEncoder

    return TimmPresetEncoder(preset, path, device=device)


@PRESET_LIBRARIES.register("transformers")
def _transformers_preset(preset: EncoderPreset, path: Path, device: str) -> TileEncoder:
    from slidevl.features.encoders.hf_presets import TransformersPresetEncoder

    return TransformersPresetEncoder(preset, path, device=device)


@PRESET_LIBRARIES.register("conch")
def _conch_preset(preset: EncoderPreset, path: Path, device: str) -> TileEncoder:
    from slidevl.features.encoders.conch import ConchEncoder

    return ConchEncoder(path, device=device, preset=preset)


def preset_path(name: str, rest: str) -> Path:
    """The weight path of preset ``name``: given after the colon, else registered by the user."""
    if rest.strip():
        return Path(rest.strip()).expanduser()
    from slidevl.features.encoders.user_config import config_file, registered_path

    path = registered_path(name)
    if path is None:
        raise EncoderError(
            f"encoder {name!r} has no registered path in {config_file()}; run `slidevl encoders register {name} "
            f"/path/to/weights` once, or pass {name}:/path/to/weights"
        )
    return path


def get_encoder(spec: str = DEFAULT_ENCODER, *, device: str = "cpu") -> TileEncoder:
    """The tile encoder named by ``spec``, with its model (if any) on ``device``."""
    spec = spec.strip()
    preset = preset_for_spec(spec)
    if preset is not None:
        return PRESET_LIBRARIES.get(preset.library)(preset, preset_path(preset.name, spec.partition(":")[2]), device)
    parsed = parse_spec(ENCODERS, spec)
    if parsed is None:
        raise EncoderError(
            f"unknown encoder spec {spec!r}; valid forms are {', '.join(available_encoders())}; presets: {', '.join(PRESETS)}"
        )
    kind, path = parsed
    return kind.build(path, device)


def available_encoders() -> list[str]:
    """The spec forms :func:`get_encoder` understands (paths are placeholders), kinds first, then presets."""
    return [*spec_forms(ENCODERS), PRESET_FORM]


def list_encoders() -> list[str]:
    """Every name an encoder spec may start with: the spec kinds, then the presets."""
    return [*ENCODERS.names(), *preset_names()]
