"""What every survival model takes and returns.

A model maps one :class:`~slidevl.survival.data.PatientBag` to ``n_bins`` hazard
logits. It may add an auxiliary loss (HiLa's contrastive term, already weighted) and,
when asked, per-token evidence for the viewer: arrays over the bag's patches
(``patch``) and regions (``region``) that :mod:`slidevl.survival.evidence` splits
per slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slidevl.survival.data import PatientBag


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (n_bins,)
    aux_loss: torch.Tensor | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


class SurvivalModel(nn.Module):
    """Base class: subclasses set ``name`` and fill ``self.config`` with their init arguments."""

    name: str = ""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"name": self.name, **config}

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:  # pragma: no cover - interface
        raise NotImplementedError


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
