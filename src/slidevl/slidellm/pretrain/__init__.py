"""Self-supervised pretraining of the topo-pack encoder: MAE (patches, then packs), then MoCo."""

from slidevl.slidellm.pretrain.augment import (
    AugmentConfig,
    add_feature_noise,
    augment_view,
    crop_window,
    dihedral_transform,
    random_crop,
    slot_permutation,
)
from slidevl.slidellm.pretrain.checkpoint import Checkpoint, has_checkpoint, load_checkpoint
from slidevl.slidellm.pretrain.config import PretrainConfig
from slidevl.slidellm.pretrain.data import CachedSource, FeatureStoreSource, MemorySource, SlideSource
from slidevl.slidellm.pretrain.mae import MAEDecoder, MAEMask, mae_loss, mae_mask
from slidevl.slidellm.pretrain.moco import MoCoQueue, moco_logits, moco_loss, negative_mask, pick_positives, slide_key
from slidevl.slidellm.pretrain.modules import MomentumNetworks, PretrainModel, models_from_checkpoint
from slidevl.slidellm.pretrain.trainer import PretrainResult, pretrain

__all__ = [
    "AugmentConfig",
    "CachedSource",
    "Checkpoint",
    "FeatureStoreSource",
    "MAEDecoder",
    "MAEMask",
    "MemorySource",
    "MoCoQueue",
    "MomentumNetworks",
    "PretrainConfig",
    "PretrainModel",
    "PretrainResult",
    "SlideSource",
    "add_feature_noise",
    "augment_view",
    "crop_window",
    "dihedral_transform",
    "has_checkpoint",
    "load_checkpoint",
    "mae_loss",
    "mae_mask",
    "models_from_checkpoint",
    "moco_logits",
    "moco_loss",
    "negative_mask",
    "pick_positives",
    "pretrain",
    "random_crop",
    "slide_key",
    "slot_permutation",
]
