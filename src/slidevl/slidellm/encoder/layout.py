"""Token layout of a topo-pack sequence: which token is which, and which are real.

The sequence of every slide is ``[patches by pack (P·k² slots)][summaries (P)][global (1)]``.
Grouping patches by pack makes every pack one contiguous block of k² keys, and putting
all summaries side by side makes the summary-to-summary term one contiguous block too;
an interleaved order would scatter both and leave no block empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slidevl.slidellm.encoder.batch import TopoPackBatch

PATCH, SUMMARY, GLOBAL = 0, 1, 2
#: Token type of sequence padding added only to reach a kernel block multiple.
PAD = -1


@dataclass
class TokenLayout:
    """Validity of every token of a batch, plus the sequence bookkeeping around it.

    ``patch_valid`` and ``summary_valid`` are what the attention sees: a token that is
    False here is padding (an empty slot, a padded pack, or a token hidden by MAE) and
    is never attended to. The global token is always valid.
    """

    pack_size: int
    patch_valid: Tensor  # (B, P, k*k) bool
    summary_valid: Tensor  # (B, P) bool

    @classmethod
    def from_batch(
        cls,
        batch: TopoPackBatch,
        *,
        patch_keep: Tensor | None = None,
        summary_keep: Tensor | None = None,
    ) -> "TokenLayout":
        """Layout of ``batch``, optionally hiding tokens (``*_keep`` False) as MAE does."""
        patch_valid = batch.patch_valid & batch.pack_valid[..., None]
        summary_valid = batch.pack_valid.clone()
        if patch_keep is not None:
            patch_valid = patch_valid & patch_keep.to(patch_valid.device, torch.bool)
        if summary_keep is not None:
            summary_valid = summary_valid & summary_keep.to(summary_valid.device, torch.bool)
        return cls(batch.pack_size, patch_valid, summary_valid)

    @property
    def batch_size(self) -> int:
        return int(self.patch_valid.shape[0])

    @property
    def num_packs(self) -> int:
        return int(self.patch_valid.shape[1])

    @property
    def slots(self) -> int:
        return self.pack_size * self.pack_size

    @property
    def num_patch_tokens(self) -> int:
        return self.num_packs * self.slots

    @property
    def num_tokens(self) -> int:
        return self.num_packs * (self.slots + 1) + 1

    @property
    def device(self) -> torch.device:
        return self.patch_valid.device

    def token_valid(self) -> Tensor:
        """(B, N) bool: which tokens are real."""
        b = self.batch_size
        return torch.cat(
            [
                self.patch_valid.reshape(b, -1),
                self.summary_valid,
                torch.ones(b, 1, dtype=torch.bool, device=self.device),
            ],
            dim=1,
        )

    def token_type(self, length: int | None = None) -> Tensor:
        """(N,) int64 token types; positions past ``num_tokens`` (up to ``length``) are PAD."""
        p, s = self.num_packs, self.slots
        parts = [
            torch.full((p * s,), PATCH, dtype=torch.long),
            torch.full((p,), SUMMARY, dtype=torch.long),
            torch.full((1,), GLOBAL, dtype=torch.long),
        ]
        if length is not None and length > self.num_tokens:
            parts.append(torch.full((length - self.num_tokens,), PAD, dtype=torch.long))
        return torch.cat(parts).to(self.device)

    def token_pack(self, length: int | None = None) -> Tensor:
        """(N,) int64 pack of every token; -1 for the global token and PAD positions."""
        p, s = self.num_packs, self.slots
        packs = torch.arange(p, dtype=torch.long)
        parts = [packs.repeat_interleave(s), packs, torch.full((1,), -1, dtype=torch.long)]
        if length is not None and length > self.num_tokens:
            parts.append(torch.full((length - self.num_tokens,), -1, dtype=torch.long))
        return torch.cat(parts).to(self.device)
