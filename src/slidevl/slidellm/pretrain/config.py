"""Settings of a topo-pack pretraining run (MAE phase 1 → MAE phase 2 → MoCo)."""

from __future__ import annotations

from dataclasses import dataclass

from slidevl.config import Config
from slidevl.errors import ConfigError

#: Fields that may change when a run is resumed: they extend or re-pace the schedule
#: without changing what the model or the losses are.
RESUMABLE_FIELDS = ("mae_steps", "moco_steps", "save_every", "log_every")


@dataclass
class PretrainConfig(Config):
    """Schedule, losses, augmentation and optimisation of :func:`pretrain`.

    Steps are optimiser steps; each is ``grad_accum`` micro-batches of
    ``batch_slides`` slides. The run is ``mae_steps`` of MAE, of which the first
    ``phase1_fraction`` mask patches within packs (texture) and the rest mask whole
    packs (structure), followed by ``moco_steps`` of MoCo on summary tokens.
    """

    mae_steps: int = 1000
    moco_steps: int = 500
    phase1_fraction: float = 0.5
    mask_ratio: float = 0.75
    # MAE decoder: light, as in the paper (2 layers, width 256).
    decoder_dim: int = 256
    decoder_layers: int = 2
    decoder_heads: int = 8
    normalise_targets: bool = True
    # MoCo on summary tokens.
    moco_dim: int = 128
    moco_queue: int = 8192
    moco_momentum: float = 0.999
    moco_temperature: float = 0.07
    moco_same_pack_prob: float = 0.5
    moco_queries: int = 256
    moco_enqueue: int = 64
    # Feature-level augmentation.
    crop_min: float = 0.5
    crop_max: float = 1.0
    max_packs: int = 4096
    dihedral: bool = True
    mae_noise: float = 0.0
    moco_noise: float = 0.1
    # Optimisation.
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    batch_slides: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    save_every: int = 200
    # The loss log is rewritten (CSV + JSON) every log_every steps and at checkpoints.
    log_every: int = 10
    cache_slides: int = 8

    def __post_init__(self) -> None:
        if self.mae_steps < 0 or self.moco_steps < 0 or self.total_steps == 0:
            raise ConfigError("mae_steps and moco_steps must be >= 0 and not both 0")
        if not 0.0 <= self.phase1_fraction <= 1.0:
            raise ConfigError(f"phase1_fraction must be in [0, 1], got {self.phase1_fraction}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.moco_momentum < 1.0:
            raise ConfigError(f"moco_momentum must be in [0, 1), got {self.moco_momentum}")
        if self.batch_slides < 1 or self.grad_accum < 1:
            raise ConfigError("batch_slides and grad_accum must be >= 1")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.save_every < 1 or self.log_every < 1:
            raise ConfigError("save_every and log_every must be >= 1")

    @property
    def total_steps(self) -> int:
        return self.mae_steps + self.moco_steps

    def stage(self, step: int) -> tuple[str, int]:
        """(``"mae"``, phase 1|2) or (``"moco"``, 0) for optimiser step ``step`` (0-based)."""
        if step < self.mae_steps:
            return "mae", 1 if step < round(self.phase1_fraction * self.mae_steps) else 2
        return "moco", 0
