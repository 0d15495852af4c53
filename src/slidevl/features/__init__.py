"""Slides to features: the preprocessing pipeline, the feature store and importers.

Heavy modules (torch, OpenSlide) load on first use, so ``slidevl.features.store`` stays
cheap to import for code that only reads feature files.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "preprocess": "slidevl.features.pipeline",
    "JobReport": "slidevl.features.pipeline",
    "SlideResult": "slidevl.features.pipeline",
    "PreprocessConfig": "slidevl.features.config",
    "import_features": "slidevl.features.importer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slidevl.features' has no attribute {name!r}")
