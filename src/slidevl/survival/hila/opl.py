"""Optimal Prompt Learning (OPL): match risk-level prompts to visual tokens by optimal transport.

For each risk level ``l`` the P prompts of that level and the M tokens form one entropic
OT problem (cost ``1 - cosine``, uniform marginals; the levels are solved as one batch).
The plan is computed without gradient, as in PLOT; gradients reach both the text
projection and the visual tokens through the score ``score_l = Σ plan_l ⊙ sim_l``.

Token selection. With uniform marginals a converged plan gives every token the same
column mass (1/M), so the raw column mass cannot rank tokens. A token's alignment is
instead its column of ``plan ⊙ sim`` — the part of the alignment score it carries —
scaled by M and averaged over levels, which puts it in cosine units:

    alignment_m = (M / L) Σ_l Σ_p plan[l, p, m] · sim[l, p, m]

and the top ``ceil(ratio · M)`` tokens are kept. Each token's matched prompt is the
argmax of its plan column over all prompts of all levels.

``use_ot=False`` is the single-prompt ablation (Model-A): the first prompt of each
level only, the score is the mean cosine over tokens (the plan a single prompt with
uniform marginals would get), and tokens are ranked by their mean cosine over levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slidevl.survival.sinkhorn import sinkhorn_log


@dataclass
class OPLOutput:
    scores: torch.Tensor  # (L,) alignment score per risk level (differentiable)
    keep: torch.Tensor  # (k,) indices of the kept tokens, best first
    alignment: torch.Tensor  # (M,) per-token alignment (no gradient)
    prompt_index: torch.Tensor  # (M,) flat index (level * P + prompt) of the matched prompt
    n_iter: int


def keep_count(m: int, ratio: float) -> int:
    """Number of tokens kept: ceil(ratio · M), at least one."""
    return max(1, min(m, math.ceil(ratio * m - 1e-9)))


class OptimalPromptLearning(nn.Module):
    """Projects frozen prompt embeddings into the visual space and aligns them with tokens."""

    def __init__(
        self,
        text_embeddings: torch.Tensor,
        prompt_mask: torch.Tensor,
        dim: int,
        *,
        ratio: float = 0.6,
        eps: float = 0.1,
        max_iter: int = 100,
        tol: float = 1e-6,
        use_ot: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"token keep ratio must be in (0, 1], got {ratio}")
        # Frozen text-encoder outputs: buffers, stored in the checkpoint, never re-encoded.
        self.register_buffer("text", text_embeddings.float())
        self.register_buffer("prompt_mask", prompt_mask.bool())
        self.text_proj = nn.Linear(text_embeddings.shape[-1], dim)
        self.ratio, self.eps, self.max_iter, self.tol, self.use_ot = ratio, eps, max_iter, tol, use_ot

    @property
    def n_levels(self) -> int:
        return int(self.text.shape[0])

    def prompts(self) -> torch.Tensor:
        """Projected, L2-normalised prompts (L, P, dim)."""
        return F.normalize(self.text_proj(self.text), dim=-1)

    def forward(self, tokens: torch.Tensor) -> OPLOutput:
        m = tokens.shape[0]
        sim = torch.einsum("lpd,md->lpm", self.prompts(), F.normalize(tokens, dim=-1))
        if self.use_ot:
            mask = self.prompt_mask.to(sim.dtype)
            result = sinkhorn_log(
                1.0 - sim.detach(), self.eps, a=mask / mask.sum(dim=1, keepdim=True), max_iter=self.max_iter, tol=self.tol
            )
            plan, n_iter = result.plan, result.n_iter
            weighted = plan * sim
            scores = weighted.sum(dim=(1, 2))
            alignment = weighted.detach().sum(dim=1).mean(dim=0) * m
            prompt_index = plan.reshape(-1, m).argmax(dim=0)
        else:
            first = sim[:, 0, :]
            scores = first.mean(dim=1)
            alignment = first.detach().mean(dim=0)
            # Flat index of prompt 0 of the best level, in the same (level * P + prompt) layout.
            prompt_index = first.argmax(dim=0) * sim.shape[1]
            n_iter = 0
        keep = torch.topk(alignment, keep_count(m, self.ratio)).indices
        return OPLOutput(scores, keep, alignment, prompt_index, n_iter)
