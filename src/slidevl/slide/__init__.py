"""Whole-slide images: opening (OpenSlide, tifffile fallback), mpp, tissue, GeoJSON, QC."""

from slidevl.slide.mpp import MissingMppError, MppInfo, load_mpp_csv, resolve_mpp
from slidevl.slide.reader import Slide, SlideOpenError, SlideReadError, open_slide
from slidevl.slide.tissue import TissueMask, TissueParams, segment_slide

__all__ = [
    "MissingMppError",
    "MppInfo",
    "Slide",
    "SlideOpenError",
    "SlideReadError",
    "TissueMask",
    "TissueParams",
    "load_mpp_csv",
    "open_slide",
    "resolve_mpp",
    "segment_slide",
]
