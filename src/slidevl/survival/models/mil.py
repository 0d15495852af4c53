"""Multiple-instance baselines: mean pooling and gated-attention MIL (Ilse et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn

from slidevl.survival.data import PatientBag
from slidevl.survival.models.base import SURVIVAL_MODELS, ModelOutput, SurvivalModel, to_numpy


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


@SURVIVAL_MODELS.register("meanpool")
class MeanPoolMIL(SurvivalModel):
    """Embed each patch, average over the bag, classify."""

    def __init__(self, in_dim: int, n_bins: int = 4, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim=in_dim, n_bins=n_bins, hidden=hidden, dropout=dropout)
        self.embed = _embed(in_dim, hidden, dropout)
        self.head = nn.Linear(hidden, n_bins)

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:
        return ModelOutput(self.head(self.embed(bag.patch).mean(dim=0)))


class GatedAttention(nn.Module):
    """Gated attention pooling: a = w^T (tanh(V h) ⊙ sigm(U h)), softmax over the bag."""

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.w(self.v(h) * self.u(h)).squeeze(-1), dim=0)
        return weights @ h, weights


@SURVIVAL_MODELS.register("abmil")
class ABMIL(SurvivalModel):
    """Gated-attention MIL; the attention weight of every patch is its evidence."""

    gives_evidence = True

    def __init__(
        self, in_dim: int, n_bins: int = 4, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim=in_dim, n_bins=n_bins, hidden=hidden, attn_dim=attn_dim, dropout=dropout)
        self.embed = _embed(in_dim, hidden, dropout)
        self.pool = GatedAttention(hidden, attn_dim, dropout)
        self.head = nn.Linear(hidden, n_bins)

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:
        pooled, weights = self.pool(self.embed(bag.patch))
        out = ModelOutput(self.head(pooled))
        if evidence:
            out.evidence = {"patch": {"attention": to_numpy(weights)}}
        return out
