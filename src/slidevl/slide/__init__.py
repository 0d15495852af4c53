"""Whole-slide images: opening (OpenSlide, tifffile fallback), mpp, tissue, GeoJSON, QC.

The names below load their module on first use, so importing a light submodule (e.g.
:mod:`slidevl.slide.formats` for job bookkeeping) does not pull in the imaging stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MissingMppError": "mpp",
    "MppInfo": "mpp",
    "load_mpp_csv": "mpp",
    "resolve_mpp": "mpp",
    "Slide": "reader",
    "SlideOpenError": "reader",
    "SlideReadError": "reader",
    "open_slide": "reader",
    "TissueMask": "tissue",
    "TissueParams": "tissue",
    "segment_slide": "tissue",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
