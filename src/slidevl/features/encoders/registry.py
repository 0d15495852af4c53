"""Build tile encoders from spec strings.

Specs:

* ``handcrafted`` (the default): stain, nuclear, texture and colour statistics, no weights;
* ``NAME:PATH`` for a named foundation model (:data:`.presets.PRESETS`: ``uni``,
  ``conch``, ``virchow2``, ...), PATH being the folder as the hub ships it or the weight
  file; ``NAME`` alone once ``slidevl encoders register NAME PATH`` recorded its path;
* ``hf:/local/dir``: any ``transformers`` vision model saved with ``save_pretrained``;
* ``openclip:/local/dir`` or ``openclip:ARCH@/local/checkpoint``: an open_clip image tower.

Model weights are only ever read from local paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slidevl.features.encoders.base import EncoderError, TileEncoder
from slidevl.features.encoders.handcrafted import HandcraftedEncoder
from slidevl.features.encoders.hf import HFEncoder
from slidevl.features.encoders.openclip import OpenCLIPEncoder
from slidevl.features.encoders.presets import PRESETS, EncoderPreset, preset_for_spec

DEFAULT_ENCODER = "handcrafted"
SPEC_FORMS = (
    "handcrafted",
    "NAME:/path/to/weights (a preset, see `slidevl encoders list`)",
    "hf:/path/to/model_dir",
    "openclip:/path/to/dir_or_ARCH@checkpoint",
)


def preset_builder(preset: EncoderPreset) -> Callable[..., TileEncoder]:
    """The encoder class that builds ``preset`` with its own library."""
    if preset.library == "timm":
        from slidevl.features.encoders.timm_presets import TimmPresetEncoder as cls
    elif preset.library == "transformers":
        from slidevl.features.encoders.hf_presets import TransformersPresetEncoder as cls
    else:
        from slidevl.features.encoders.conch import ConchEncoder

        return lambda preset, path, device: ConchEncoder(path, device=device, preset=preset)
    return lambda preset, path, device: cls(preset, path, device=device)


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
    if spec == "handcrafted":
        # Pure numpy in the workers: the device does not apply.
        return HandcraftedEncoder()
    kind, sep, rest = spec.partition(":")
    preset = preset_for_spec(spec)
    if preset is not None:
        return preset_builder(preset)(preset, preset_path(preset.name, rest), device)
    if sep and not rest.strip():
        raise EncoderError(f"encoder spec {spec!r} names no path; e.g. {kind}:/models/my-model")
    if kind == "hf" and sep:
        return HFEncoder(rest, device=device)
    if kind == "openclip" and sep:
        return OpenCLIPEncoder(rest, device=device)
    raise EncoderError(
        f"unknown encoder spec {spec!r}; valid forms are {', '.join(SPEC_FORMS)}; presets: {', '.join(PRESETS)}"
    )


def available_encoders() -> list[str]:
    """The spec forms :func:`get_encoder` understands (paths are placeholders)."""
    return list(SPEC_FORMS)
