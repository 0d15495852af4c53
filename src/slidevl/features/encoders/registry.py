"""Build tile encoders from spec strings.

Specs:

* ``handcrafted`` (the default): stain, nuclear, texture and colour statistics, no weights;
* ``hf:/local/dir``: a ``transformers`` vision model saved with ``save_pretrained``;
* ``openclip:/local/dir`` or ``openclip:ARCH@/local/checkpoint``: an open_clip image tower.

Model weights are only ever read from local paths.
"""

from __future__ import annotations

from slidevl.features.encoders.base import EncoderError, TileEncoder
from slidevl.features.encoders.handcrafted import HandcraftedEncoder
from slidevl.features.encoders.hf import HFEncoder
from slidevl.features.encoders.openclip import OpenCLIPEncoder

DEFAULT_ENCODER = "handcrafted"
SPEC_FORMS = ("handcrafted", "hf:/path/to/model_dir", "openclip:/path/to/dir_or_ARCH@checkpoint")


def get_encoder(spec: str = DEFAULT_ENCODER, *, device: str = "cpu") -> TileEncoder:
    """The tile encoder named by ``spec``, with its model (if any) on ``device``."""
    spec = spec.strip()
    if spec == "handcrafted":
        # Pure numpy in the workers: the device does not apply.
        return HandcraftedEncoder()
    kind, sep, rest = spec.partition(":")
    if sep and not rest.strip():
        raise EncoderError(f"encoder spec {spec!r} names no path; e.g. {kind}:/models/my-model")
    if kind == "hf" and sep:
        return HFEncoder(rest, device=device)
    if kind == "openclip" and sep:
        return OpenCLIPEncoder(rest, device=device)
    raise EncoderError(f"unknown encoder spec {spec!r}; valid forms are {', '.join(SPEC_FORMS)}")


def available_encoders() -> list[str]:
    """The spec forms :func:`get_encoder` understands (paths are placeholders)."""
    return list(SPEC_FORMS)
