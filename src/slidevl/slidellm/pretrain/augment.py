"""Feature-level augmentation of a single-slide pack batch.

Pretraining works on stored features, not pixels, so views are made on the pack grid:

* crops: a random rectangular window of packs (optionally shrunk to a pack budget);
* the 8 symmetries of the square (flips and 90° rotations), applied consistently to
  pack positions and to patch slots inside each pack, i.e. a rotation of the whole
  patch lattice about a pack corner;
* Gaussian feature noise, scaled to each feature table's spread.

``pack_origin`` is never changed: it is how MoCo recognises the same pack, and its
neighbours, across two views.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from slidevl.config import Config
from slidevl.slidellm.encoder.batch import TopoPackBatch

N_DIHEDRAL = 8


def _dihedral(c: Tensor, r: Tensor, t: int, extent: int) -> tuple[Tensor, Tensor]:
    """Apply symmetry ``t`` (flip if t >= 4, then t % 4 quarter turns) to (col, row).

    ``extent`` is k-1 for slots inside a k×k pack and 0 for unbounded pack positions:
    a reflection maps x to extent - x.
    """
    if t >= 4:
        c = extent - c
    for _ in range(t % 4):
        c, r = r, extent - c
    return c, r


def slot_permutation(pack_size: int, t: int) -> Tensor:
    """(k²,) long: ``perm[s]`` is the slot that slot ``s`` moves to under symmetry ``t``."""
    k = pack_size
    s = torch.arange(k * k)
    c, r = _dihedral(s % k, s // k, t, k - 1)
    return r * k + c


def transform_patch_grid(grid: Tensor, pack_size: int, t: int) -> Tensor:
    """The same symmetry on absolute patch positions (col, row), before re-anchoring.

    Used to check that packs and slots move together: a patch at (col, row) ends up at
    ``k * new_pack + new_slot`` up to a whole-pack shift.
    """
    c, r = _dihedral(grid[..., 0], grid[..., 1], t, pack_size - 1)
    return torch.stack([c, r], dim=-1)


def dihedral_transform(batch: TopoPackBatch, t: int) -> TopoPackBatch:
    """Rotate/flip the pack grid of a single-slide batch by symmetry ``t`` in 0..7.

    Pack positions are transformed and shifted back to start at (0, 0); the k² patch
    slots of every pack are permuted by the same symmetry.
    """
    if not 0 <= t < N_DIHEDRAL:
        raise ValueError(f"symmetry index must be in 0..7, got {t}")
    if t == 0:
        return batch
    perm = slot_permutation(batch.pack_size, t).to(batch.device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    c, r = _dihedral(batch.pack_grid[..., 0], batch.pack_grid[..., 1], t, 0)
    grid = torch.stack([c, r], dim=-1)
    valid = batch.pack_valid
    big = torch.iinfo(torch.long).max
    origin = torch.where(valid[..., None], grid, torch.full_like(grid, big)).amin(dim=1, keepdim=True)
    origin = torch.where(origin == big, torch.zeros_like(origin), origin)
    return replace(
        batch,
        patch_features=batch.patch_features[:, :, inv],
        patch_valid=batch.patch_valid[:, :, inv],
        patch_index=batch.patch_index[:, :, inv],
        pack_grid=torch.where(valid[..., None], grid - origin, torch.zeros_like(grid)),
    )


def crop_window(batch: TopoPackBatch, col0: int, row0: int, cols: int, rows: int) -> TopoPackBatch:
    """Keep the packs of a single-slide batch whose grid lies in the given window."""
    g = batch.pack_grid[0]
    inside = (
        batch.pack_valid[0]
        & (g[:, 0] >= col0)
        & (g[:, 0] < col0 + cols)
        & (g[:, 1] >= row0)
        & (g[:, 1] < row0 + rows)
    )
    return batch.select_packs(torch.nonzero(inside).flatten())


def random_crop(
    batch: TopoPackBatch,
    generator: torch.Generator,
    *,
    min_frac: float = 0.5,
    max_frac: float = 1.0,
    max_packs: int | None = None,
) -> TopoPackBatch:
    """A random rectangular window of packs, each side a fraction of the slide's extent.

    With ``max_packs`` the window shrinks (keeping its centre) until it holds at most
    that many packs, which bounds the memory of a step on very large slides. The
    window is centred on a random existing pack so it is never empty.
    """
    if batch.batch_size != 1:
        raise ValueError("random_crop works on single-slide batches")
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"crop fractions must satisfy 0 < min <= max <= 1, got {min_frac}, {max_frac}")
    idx = torch.nonzero(batch.pack_valid[0]).flatten()
    g = batch.pack_grid[0, idx]
    lo, hi = g.amin(0), g.amax(0)
    extent = (hi - lo + 1).to(torch.float64)
    frac = min_frac + (max_frac - min_frac) * torch.rand(2, generator=generator, dtype=torch.float64)
    size = torch.clamp(torch.round(extent * frac), min=1)
    centre = g[int(torch.randint(len(idx), (1,), generator=generator))].to(torch.float64)
    while True:
        start = torch.floor(centre - (size - 1) / 2).long()
        # Slide the window back inside the slide's extent where it overhangs.
        start = torch.maximum(torch.minimum(start, hi - size.long() + 1), lo)
        out = crop_window(batch, int(start[0]), int(start[1]), int(size[0]), int(size[1]))
        if max_packs is None or out.num_packs <= max_packs or bool((size <= 1).all()):
            return out
        size = torch.clamp(torch.floor(size * 0.8), min=1)


def add_feature_noise(batch: TopoPackBatch, generator: torch.Generator, std: float) -> TopoPackBatch:
    """Add N(0, (std·σ)²) noise to patch, pack and global features (σ: per table, per slide).

    Noise only touches real entries; padding stays zero.
    """
    if std <= 0:
        return batch

    def noisy(x: Tensor, valid: Tensor | None) -> Tensor:
        if x.numel() == 0:
            return x
        sel = x[valid] if valid is not None else x
        sigma = sel.std() if sel.numel() > 1 else x.new_tensor(1.0)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        noise = noise * (std * sigma)
        if valid is not None:
            noise = noise * valid[..., None].to(x.dtype)
        return x + noise

    return replace(
        batch,
        patch_features=noisy(batch.patch_features, batch.patch_valid),
        pack_features=noisy(batch.pack_features, batch.pack_present),
        global_feature=noisy(batch.global_feature, batch.global_present),
    )


@dataclass
class AugmentConfig(Config):
    """Which augmentations a view gets."""

    crop_min: float = 0.5
    crop_max: float = 1.0
    max_packs: int | None = 4096
    dihedral: bool = True
    noise: float = 0.0


def random_symmetry(generator: torch.Generator) -> int:
    return int(torch.randint(N_DIHEDRAL, (1,), generator=generator))


def augment_view(batch: TopoPackBatch, generator: torch.Generator, config: AugmentConfig, *, crop: bool = True) -> TopoPackBatch:
    """One augmented view of a single-slide batch: crop, symmetry, noise (in that order)."""
    if crop:
        batch = random_crop(batch, generator, min_frac=config.crop_min, max_frac=config.crop_max, max_packs=config.max_packs)
    if config.dihedral:
        batch = dihedral_transform(batch, random_symmetry(generator))
    return add_feature_noise(batch, generator, config.noise)
