"""Tile and region encoders, behind one registry.

Tile encoders (:func:`get_encoder`, :func:`list_encoders`): ``handcrafted`` (default,
no weights), ``hf:/local/dir`` (transformers vision models), ``openclip:...``
(open_clip/CONCH style) and the named presets (``uni:/path``, ...). Each follows
:class:`TileEncoder`: ``worker_transform`` runs in DataLoader workers on uint8 batches,
``encode`` in the main process.

Region encoders (:func:`get_region_encoder`): ``mean``, ``meanmax`` and ``vit:/local/dir``
turn a region's 16 x 16 grid of patch features into one feature.
"""

from slidevl.features.encoders.base import EncoderError, TileEncoder
from slidevl.features.encoders.handcrafted import HandcraftedConfig, HandcraftedEncoder
from slidevl.features.encoders.hf import HFEncoder
from slidevl.features.encoders.openclip import OpenCLIPEncoder
from slidevl.features.encoders.region import (
    MeanMaxRegionEncoder,
    MeanRegionEncoder,
    RegionEncoder,
    ViTRegionEncoder,
    available_region_encoders,
    get_region_encoder,
)
from slidevl.features.encoders.registry import DEFAULT_ENCODER, available_encoders, get_encoder, list_encoders
from slidevl.features.encoders.transforms import ResizeNormalize

__all__ = [
    "DEFAULT_ENCODER",
    "EncoderError",
    "HFEncoder",
    "HandcraftedConfig",
    "HandcraftedEncoder",
    "MeanMaxRegionEncoder",
    "MeanRegionEncoder",
    "OpenCLIPEncoder",
    "RegionEncoder",
    "ResizeNormalize",
    "TileEncoder",
    "ViTRegionEncoder",
    "available_encoders",
    "available_region_encoders",
    "get_encoder",
    "get_region_encoder",
    "list_encoders",
]
