"""The discrete-time negative log-likelihood of MCAT / Patch-GCN.

With hazards ``h`` (sigmoid of the model's logits, one per bin), survival
``S = cumprod(1 - h)`` and ``S_padded = [1, S]``, a patient in bin ``Y`` with
censorship ``c = 1 - e`` contributes

    uncensored = -(1 - c) * (log S_padded[Y] + log h[Y])     # died in bin Y
    censored   = -c * log S_padded[Y + 1]                     # survived bin Y
    loss       = (1 - alpha) * (censored + uncensored) + alpha * uncensored

so ``alpha`` up-weights the uncensored term. Probabilities are clamped at ``eps``
before the log.
"""

from __future__ import annotations

import torch


def hazards_and_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin hazards (sigmoid) and the survival function ``cumprod(1 - h)``."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1 - hazards, dim=-1)


def risk_from_survival(survival: torch.Tensor) -> torch.Tensor:
    """Risk score ``-sum(S)``: higher means shorter expected survival."""
    return -survival.sum(dim=-1)


def nll_loss(
    hazards: torch.Tensor,
    survival: torch.Tensor | None,
    y: torch.Tensor,
    c: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Mean discrete-time NLL over a batch.

    hazards, survival: (B, n_bins); ``survival`` may be None (recomputed from hazards).
    y: (B,) bin index; c: (B,) censorship indicator (1 = censored, i.e. ``1 - e``).
    """
    y = y.reshape(-1, 1).long()
    c = c.reshape(-1, 1).to(hazards.dtype)
    if survival is None:
        survival = torch.cumprod(1 - hazards, dim=1)
    s_padded = torch.cat([torch.ones_like(c), survival], dim=1)
    uncensored = -(1 - c) * (
        torch.log(torch.gather(s_padded, 1, y).clamp(min=eps)) + torch.log(torch.gather(hazards, 1, y).clamp(min=eps))
    )
    censored = -c * torch.log(torch.gather(s_padded, 1, y + 1).clamp(min=eps))
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()
