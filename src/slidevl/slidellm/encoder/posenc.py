"""2-D sine-cosine positional encoding of pack grid positions.

The public Hepato-LLaVA encoder has no positional encoding, so a pack's place on the
slide is invisible to it. Here every pack gets the fixed MAE-style 2-D sin-cos code of
its (col, row) pack position: half of the channels encode the column, half the row.
Positions are taken relative to the slide's first valid pack so a crop or a shift of the
pack grid changes the code only by a translation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """(..., dim) code of positions ``pos`` (...,): [sin(ω·pos), cos(ω·pos)] over dim/2 frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos encoding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0)
    omega = 1.0 / base**omega
    angles = pos.to(torch.float32)[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d(grid: Tensor, dim: int) -> Tensor:
    """(..., dim) code of integer (col, row) positions ``grid`` (..., 2)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos encoding needs a width divisible by 4, got {dim}")
    return torch.cat([sincos_1d(grid[..., 0], dim // 2), sincos_1d(grid[..., 1], dim // 2)], dim=-1)


def relative_grid(grid: Tensor, valid: Tensor) -> Tensor:
    """Shift each slide's (B, P, 2) pack grid so its valid packs start at (0, 0)."""
    big = torch.iinfo(torch.long).max
    masked = torch.where(valid[..., None], grid, torch.full_like(grid, big))
    origin = masked.amin(dim=1, keepdim=True)
    origin = torch.where(origin == big, torch.zeros_like(origin), origin)
    return grid - origin
