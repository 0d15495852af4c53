"""Cross-Level Propagation (CLP): let the selected patch tokens recalibrate their regions.

The patch tokens that OPL kept are averaged per region (through the patch → region
index), giving H_P→R. A gate ``G = σ(W [H_P→R ; H_R] + b)`` then mixes the two levels:

    H_R' = G ⊙ tanh(H_P→R) + (1 − G) ⊙ tanh(H_R)

A region that received no kept patch has no patch-level evidence to propagate; it
keeps ``tanh(H_R)``, i.e. the formula with G = 0, so all regions share one activation.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_per_region(tokens: torch.Tensor, region_index: torch.Tensor, n_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token per region (R, d) and a mask of the regions that received any token."""
    sums = tokens.new_zeros(n_regions, tokens.shape[1]).index_add(0, region_index, tokens)
    counts = torch.bincount(region_index, minlength=n_regions)
    return sums / counts.clamp(min=1).unsqueeze(1).to(tokens.dtype), counts > 0


class CrossLevelPropagation(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, kept_patches: torch.Tensor, kept_regions: torch.Tensor, region_tokens: torch.Tensor) -> torch.Tensor:
        """kept_patches (k, d) with their region indices (k,); region_tokens (R, d) → H_R' (R, d)."""
        propagated, has_patch = mean_per_region(kept_patches, kept_regions, region_tokens.shape[0])
        gate = torch.sigmoid(self.gate(torch.cat([propagated, region_tokens], dim=-1)))
        gate = gate * has_patch.unsqueeze(1).to(gate.dtype)
        return gate * torch.tanh(propagated) + (1 - gate) * torch.tanh(region_tokens)
