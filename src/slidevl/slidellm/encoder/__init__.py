"""Topo-pack slide encoder with linear-scaling sparse attention (Hepato-LLaVA).

Typical use::

    from slidevl.features.store import FeatureStore
    from slidevl.slidellm.encoder import TopoPackConfig, TopoPackEncoder, batch_from_slide_features

    sf = FeatureStore(job).load(slide_id)
    batch = batch_from_slide_features(sf)
    enc = TopoPackEncoder(TopoPackConfig(patch_dim=sf.patch_features.shape[1],
                                         pack_dim=sf.pack_features.shape[1],
                                         global_dim=sf.global_feature.shape[0]))
    out = enc(batch)
    out.summary_tokens  # (1, P, 512): what the Q-Former reads
"""

from slidevl.slidellm.encoder.attention import resolve_impl, topo_attention, topo_attention_dense
from slidevl.slidellm.encoder.batch import (
    TopoPackBatch,
    TopoPackBatchError,
    batch_from_slide_features,
    build_slide_batch,
    collate_batches,
)
from slidevl.slidellm.encoder.config import ATTENTION_IMPLS, MASK_VARIANTS, TopoPackConfig
from slidevl.slidellm.encoder.gather import grouped_attention, topo_attention_gather
from slidevl.slidellm.encoder.io import load_encoder, save_encoder
from slidevl.slidellm.encoder.layout import GLOBAL, PATCH, SUMMARY, TokenLayout
from slidevl.slidellm.encoder.mask import allowed, dense_mask
from slidevl.slidellm.encoder.model import (
    TopoPackAttention,
    TopoPackBlock,
    TopoPackEmbedding,
    TopoPackEncoder,
    TopoPackOutput,
    TopoPackTransformer,
)
from slidevl.slidellm.encoder.posenc import sincos_2d
from slidevl.slidellm.encoder.split import folded_attention, topo_attention_split

__all__ = [
    "ATTENTION_IMPLS",
    "GLOBAL",
    "MASK_VARIANTS",
    "PATCH",
    "SUMMARY",
    "TokenLayout",
    "TopoPackAttention",
    "TopoPackBatch",
    "TopoPackBatchError",
    "TopoPackBlock",
    "TopoPackConfig",
    "TopoPackEmbedding",
    "TopoPackEncoder",
    "TopoPackOutput",
    "TopoPackTransformer",
    "allowed",
    "batch_from_slide_features",
    "build_slide_batch",
    "collate_batches",
    "dense_mask",
    "folded_attention",
    "grouped_attention",
    "load_encoder",
    "resolve_impl",
    "save_encoder",
    "sincos_2d",
    "topo_attention",
    "topo_attention_dense",
    "topo_attention_gather",
    "topo_attention_split",
]
