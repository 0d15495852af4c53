"""Masked autoencoding on the pack grid: texture first (phase 1), then structure (phase 2).

* Phase 1 hides ``ratio`` of the patch tokens inside every pack; summaries stay visible.
* Phase 2 hides ``ratio`` of whole packs: their patches and their summary token.

Hidden tokens are removed from the encoder's view (its attention never reads them).
A light decoder (2 layers, width 256) sees the encoder output for visible tokens and a
learned mask token at hidden positions and reconstructs the hidden patch features; the
loss is the mean squared error on hidden patches only, against per-token normalised
features (zero mean, unit variance over the feature axis, as MAE's normalised pixels).

The decoder uses the ``patch_sees_summary`` mask: with the paper's ``topo`` mask a
patch reads nothing outside its pack, so a patch of a fully hidden pack (phase 2) could
never see the neighbouring packs it has to be rebuilt from. Summaries collect the
neighbourhood and the patches of the hidden pack read their own summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidevl.slidellm.encoder.batch import TopoPackBatch
from slidevl.slidellm.encoder.gather import DEFAULT_CHUNK_ELEMENTS
from slidevl.slidellm.encoder.layout import GLOBAL, PATCH, SUMMARY, TokenLayout
from slidevl.slidellm.encoder.model import TopoPackOutput, TopoPackTransformer
from slidevl.slidellm.encoder.posenc import relative_grid, sincos_2d


@dataclass
class MAEMask:
    """Which tokens the encoder sees; ``target`` marks hidden real patches (the loss set)."""

    patch_keep: Tensor  # (B, P, S) bool
    summary_keep: Tensor  # (B, P) bool
    target: Tensor  # (B, P, S) bool


def _stochastic_round(x: Tensor, generator: torch.Generator) -> Tensor:
    # Unbiased rounding keeps the expected masked fraction at `ratio` even for packs
    # of 9 (or fewer) patches, where plain rounding would always mask 7 of 9 = 78%.
    floor = torch.floor(x)
    return (floor + (torch.rand(x.shape, generator=generator, dtype=x.dtype) < (x - floor)).to(x.dtype)).long()


def mae_mask(batch: TopoPackBatch, phase: int, generator: torch.Generator, ratio: float = 0.75) -> MAEMask:
    """Draw the MAE mask for ``phase`` 1 (patches within packs) or 2 (whole packs)."""
    if phase not in (1, 2):
        raise ValueError(f"MAE phase must be 1 or 2, got {phase}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    valid_patch = (batch.patch_valid & batch.pack_valid[..., None]).cpu()
    pack_valid = batch.pack_valid.cpu()
    b, p, s = valid_patch.shape
    if phase == 1:
        n_valid = valid_patch.sum(-1).to(torch.float64)
        n_mask = _stochastic_round(n_valid * ratio, generator)
        # Rank the real slots of every pack in random order; hide the first n_mask.
        scores = torch.rand((b, p, s), generator=generator)
        scores = torch.where(valid_patch, scores, torch.full_like(scores, 2.0))
        rank = scores.argsort(-1).argsort(-1)
        hidden = valid_patch & (rank < n_mask[..., None])
        patch_keep = ~hidden
        summary_keep = torch.ones(b, p, dtype=torch.bool)
    else:
        n_packs = pack_valid.sum(-1)
        # Keep at least one pack visible so there is something to reconstruct from.
        n_mask = torch.minimum(torch.round(n_packs.to(torch.float64) * ratio).long(), (n_packs - 1).clamp_min(0))
        scores = torch.rand((b, p), generator=generator)
        scores = torch.where(pack_valid, scores, torch.full_like(scores, 2.0))
        rank = scores.argsort(-1).argsort(-1)
        hidden_pack = pack_valid & (rank < n_mask[:, None])
        summary_keep = ~hidden_pack
        patch_keep = summary_keep[..., None].expand(b, p, s).clone()
        hidden = valid_patch & ~patch_keep
    device = batch.device
    return MAEMask(patch_keep.to(device), summary_keep.to(device), hidden.to(device))


class MAEDecoder(nn.Module):
    """Light transformer decoder that rebuilds hidden patch features from encoder tokens."""

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        pack_size: int,
        *,
        d_model: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        pos_encoding: bool = True,
        impl: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        self.pos_encoding = pos_encoding
        self.d_model = d_model
        self.embed = nn.Linear(encoder_dim, d_model)
        self.mask_token = nn.Parameter(torch.zeros(d_model))
        self.type_embed = nn.Parameter(torch.zeros(3, d_model))
        self.slot_embed = nn.Parameter(torch.zeros(pack_size * pack_size, d_model))
        for param in (self.mask_token, self.type_embed, self.slot_embed):
            nn.init.normal_(param, std=0.02)
        self.transformer = TopoPackTransformer(
            d_model,
            n_layers,
            n_heads,
            ffn_dim,
            dropout,
            variant="patch_sees_summary",
            impl=impl,
            chunk_elements=chunk_elements,
        )
        self.head = nn.Linear(d_model, patch_dim)

    def forward(self, encoded: TopoPackOutput, batch: TopoPackBatch, mask: MAEMask, *, impl: str | None = None) -> Tensor:
        """(B, P, S, patch_dim) predictions for every patch slot (only hidden ones are scored)."""
        layout = TokenLayout.from_batch(batch)  # the decoder sees every real token
        b, p, s = layout.patch_valid.shape
        x = self.embed(encoded.tokens)
        hidden = torch.cat(
            [~mask.patch_keep.reshape(b, -1), ~mask.summary_keep, torch.zeros(b, 1, dtype=torch.bool, device=x.device)],
            dim=1,
        )
        x = torch.where(hidden[..., None], self.mask_token.to(x.dtype), x)
        add = torch.cat(
            [
                (self.type_embed[PATCH] + self.slot_embed).expand(b, p, s, -1).reshape(b, p * s, -1),
                self.type_embed[SUMMARY].expand(b, p, -1),
                self.type_embed[GLOBAL].expand(b, 1, -1),
            ],
            dim=1,
        )
        x = x + add.to(x.dtype)
        if self.pos_encoding:
            pos = sincos_2d(relative_grid(batch.pack_grid, batch.pack_valid), self.d_model).to(x.dtype)
            pos_tokens = torch.cat([pos[:, :, None].expand(b, p, s, -1).reshape(b, p * s, -1), pos, pos.new_zeros(b, 1, pos.shape[-1])], dim=1)
            x = x + pos_tokens
        x = x * layout.token_valid()[..., None].to(x.dtype)
        x = self.transformer(x, layout, impl=impl)
        return self.head(x[:, : p * s]).reshape(b, p, s, -1)


def normalised_targets(patch_features: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-token standardisation over the feature axis (MAE's normalised-pixel target)."""
    return F.layer_norm(patch_features, patch_features.shape[-1:], eps=eps)


def mae_loss(pred: Tensor, batch: TopoPackBatch, mask: MAEMask, *, normalise: bool = True) -> Tensor:
    """Mean squared error over hidden real patches, in (normalised) input feature space."""
    target = batch.patch_features.to(pred.dtype)
    if normalise:
        target = normalised_targets(target)
    per_token = (pred - target).pow(2).mean(-1)
    sel = mask.target.to(per_token.dtype)
    return (per_token * sel).sum() / sel.sum().clamp_min(1.0)
