"""Per-slide arrays → the pack-structured batch the topo-pack encoder consumes.

A slide's patches live on an integer grid ``(col, row)``. Packs are the k×k cells of
that grid anchored at (0, 0): the pack of a patch is ``(col // k, row // k)`` and its
slot inside the pack is ``(row % k) * k + col % k``. Every pack that holds at least one
patch or has a summary feature becomes one pack of the batch; its missing slots are
padding. Packs are ordered in raster order (row, then column) so the order does not
depend on how the store happened to list them.

Several slides are batched by padding the pack axis to the largest slide
(:func:`collate_batches`). Training uses one slide per micro-batch with gradient
accumulation by default; padding makes larger batches possible where slides are of
similar size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from slidevl.errors import InputError

if TYPE_CHECKING:  # the store pulls in h5py; only type checkers need it here
    from slidevl.features.store import SlideFeatures


class TopoPackBatchError(InputError):
    """Per-slide arrays that cannot be arranged into packs."""


@dataclass
class TopoPackBatch:
    """A batch of slides arranged as packs of ``pack_size``² patch slots.

    Shapes use ``B`` slides, ``P`` packs (padded to the largest slide), ``S = k*k`` slots.
    """

    pack_size: int
    patch_features: Tensor  # (B, P, S, D) float; zeros in empty slots
    patch_valid: Tensor  # (B, P, S) bool: a patch occupies the slot
    patch_index: Tensor  # (B, P, S) int64: row in the slide's patch arrays, -1 if empty
    pack_features: Tensor  # (B, P, Dp) float summary-image features; Dp may be 0
    pack_present: Tensor  # (B, P) bool: the pack has a summary feature row
    pack_valid: Tensor  # (B, P) bool: the pack exists (False = batch padding)
    pack_grid: Tensor  # (B, P, 2) int64 (col, row) as the encoder sees it (after augmentation)
    pack_origin: Tensor  # (B, P, 2) int64 (col, row) in the original slide: pack identity
    pack_index: Tensor  # (B, P) int64: row in the slide's pack arrays, -1 if none
    global_feature: Tensor  # (B, Dg) float thumbnail feature; Dg may be 0
    global_present: Tensor  # (B,) bool
    slide_ids: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return int(self.patch_features.shape[0])

    @property
    def num_packs(self) -> int:
        return int(self.patch_features.shape[1])

    @property
    def slots(self) -> int:
        return self.pack_size * self.pack_size

    @property
    def num_tokens(self) -> int:
        """Sequence length: P·k² patch slots, P summaries, one global token."""
        return self.num_packs * (self.slots + 1) + 1

    @property
    def device(self) -> torch.device:
        return self.patch_features.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TopoPackBatch":
        """Move every tensor to ``device``; floating features optionally cast to ``dtype``."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                changes[f.name] = value.to(device=device, dtype=cast) if cast else value.to(device)
        return replace(self, **changes)

    def select_packs(self, index: Tensor) -> "TopoPackBatch":
        """Keep the packs ``index`` (1-D, in the given order) of a single-slide batch."""
        if self.batch_size != 1:
            raise ValueError("select_packs works on single-slide batches; select before collating")
        index = index.to(self.device, torch.long)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() >= 2 and f.name not in ("global_feature",):
                changes[f.name] = value[:, index]
        return replace(self, **changes)

    def split(self) -> list["TopoPackBatch"]:
        """Undo :func:`collate_batches`: one single-slide batch per slide, padding dropped."""
        out = []
        for b in range(self.batch_size):
            one = self._row(b)
            out.append(one.select_packs(torch.nonzero(one.pack_valid[0]).flatten()))
        return out

    def _row(self, b: int) -> "TopoPackBatch":
        changes = {f.name: getattr(self, f.name)[b : b + 1] for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, slide_ids=(self.slide_ids[b],), **changes)


def _as_grid(name: str, array: np.ndarray, rows: int, slide_id: str) -> np.ndarray:
    grid = np.asarray(array)
    if grid.shape != (rows, 2):
        raise TopoPackBatchError(f"slide {slide_id!r}: {name} must have shape ({rows}, 2), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        if not np.all(np.equal(np.mod(grid, 1), 0)):
            raise TopoPackBatchError(f"slide {slide_id!r}: {name} must hold integer grid positions")
    return grid.astype(np.int64)


def build_slide_batch(
    patch_features: np.ndarray | Tensor,
    patch_grid: np.ndarray | Tensor,
    *,
    pack_features: np.ndarray | Tensor | None = None,
    pack_grid: np.ndarray | Tensor | None = None,
    global_feature: np.ndarray | Tensor | None = None,
    pack_size: int = 3,
    slide_id: str = "",
) -> TopoPackBatch:
    """Arrange one slide's feature arrays into a single-slide :class:`TopoPackBatch`.

    Args:
        patch_features: (N, D) patch features.
        patch_grid: (N, 2) integer patch positions (col, row) on the slide's patch lattice.
        pack_features: (P, Dp) summary features of the stitched pack images, or None.
        pack_grid: (P, 2) pack positions (col, row); required with ``pack_features`` and
            may be given alone to declare packs without features.
        global_feature: (Dg,) thumbnail feature, or None.
        pack_size: k, the pack side in patches.
        slide_id: used in error messages and by MoCo to keep negatives off the slide.
    """
    k = int(pack_size)
    if k < 1:
        raise TopoPackBatchError(f"pack_size must be >= 1, got {pack_size}")
    feats = np.asarray(patch_features, dtype=np.float32)
    if feats.ndim != 2:
        raise TopoPackBatchError(f"slide {slide_id!r}: patch_features must be (N, D), got shape {feats.shape}")
    n = feats.shape[0]
    grid = _as_grid("patch_grid", patch_grid, n, slide_id)
    if pack_features is not None and pack_grid is None:
        raise TopoPackBatchError(f"slide {slide_id!r}: pack_features given without pack_grid")
    if pack_grid is not None:
        pgrid = _as_grid("pack_grid", pack_grid, len(np.asarray(pack_grid)), slide_id)
    else:
        pgrid = np.zeros((0, 2), np.int64)
    if pack_features is not None:
        pfeats = np.asarray(pack_features, dtype=np.float32)
        if pfeats.ndim != 2 or pfeats.shape[0] != pgrid.shape[0]:
            raise TopoPackBatchError(
                f"slide {slide_id!r}: pack_features must be (P, Dp) with P = len(pack_grid) = {pgrid.shape[0]}, got {pfeats.shape}"
            )
    else:
        pfeats = np.zeros((pgrid.shape[0], 0), np.float32)
    if n == 0 and pgrid.shape[0] == 0:
        raise TopoPackBatchError(f"slide {slide_id!r}: no patches and no packs")

    patch_pack = np.floor_divide(grid, k)
    # slot = (row % k) * k + col % k; numpy's mod is non-negative for k > 0, as the grid needs.
    slot = np.mod(grid[:, 1], k) * k + np.mod(grid[:, 0], k)

    # Raster order: unique on (row, col) sorts by row first.
    all_packs_rc = np.concatenate([patch_pack[:, ::-1], pgrid[:, ::-1]], axis=0)
    uniq_rc, inverse = np.unique(all_packs_rc, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_packs = uniq_rc.shape[0]
    patch_to_pack = inverse[:n]
    row_to_pack = inverse[n:]
    if len(np.unique(row_to_pack)) != len(row_to_pack):
        raise TopoPackBatchError(f"slide {slide_id!r}: pack_grid lists the same pack twice")

    flat = patch_to_pack * (k * k) + slot
    if len(np.unique(flat)) != n:
        dup = np.flatnonzero(np.bincount(flat) > 1)[0]
        raise TopoPackBatchError(
            f"slide {slide_id!r}: two patches share pack {tuple(uniq_rc[dup // (k * k)][::-1])} slot {dup % (k * k)}; "
            "patch_grid must hold one patch per grid cell"
        )

    s = k * k
    pf = np.zeros((n_packs * s, feats.shape[1]), np.float32)
    pf[flat] = feats
    pvalid = np.zeros(n_packs * s, bool)
    pvalid[flat] = True
    pidx = np.full(n_packs * s, -1, np.int64)
    pidx[flat] = np.arange(n)
    sf = np.zeros((n_packs, pfeats.shape[1]), np.float32)
    sf[row_to_pack] = pfeats
    present = np.zeros(n_packs, bool)
    if pack_features is not None:
        present[row_to_pack] = True
    pack_index = np.full(n_packs, -1, np.int64)
    pack_index[row_to_pack] = np.arange(len(row_to_pack))

    if global_feature is not None:
        g = np.asarray(global_feature, dtype=np.float32).reshape(-1)
        g_present = True
    else:
        g = np.zeros(0, np.float32)
        g_present = False

    pack_cr = torch.from_numpy(np.ascontiguousarray(uniq_rc[:, ::-1]))[None]
    return TopoPackBatch(
        pack_size=k,
        patch_features=torch.from_numpy(pf).view(1, n_packs, s, -1),
        patch_valid=torch.from_numpy(pvalid).view(1, n_packs, s),
        patch_index=torch.from_numpy(pidx).view(1, n_packs, s),
        pack_features=torch.from_numpy(sf)[None],
        pack_present=torch.from_numpy(present)[None],
        pack_valid=torch.ones(1, n_packs, dtype=torch.bool),
        pack_grid=pack_cr.clone(),
        pack_origin=pack_cr.clone(),
        pack_index=torch.from_numpy(pack_index)[None],
        global_feature=torch.from_numpy(g)[None],
        global_present=torch.tensor([g_present]),
        slide_ids=(slide_id,),
    )


def batch_from_slide_features(sf: "SlideFeatures") -> TopoPackBatch:
    """Build a single-slide batch from a feature-store record.

    Uses ``patch_grid`` and the pack size from ``sf.attrs['pack_size']``. The store's own
    ``patch_pack`` index must agree with ``patch_grid // k``; a mismatch means the store
    and the encoder disagree on pack anchoring, which is an error rather than a guess.
    """
    k = sf.pack_size
    if sf.pack_grid is not None and sf.n_patches:
        expected = np.floor_divide(np.asarray(sf.patch_grid, np.int64), k)
        stored = np.asarray(sf.pack_grid, np.int64)[np.asarray(sf.patch_pack, np.int64)]
        bad = np.flatnonzero(np.any(expected != stored, axis=1))
        if bad.size:
            i = int(bad[0])
            raise TopoPackBatchError(
                f"slide {sf.slide_id!r}: patch {i} at grid {tuple(sf.patch_grid[i])} is filed under pack "
                f"{tuple(stored[i])} but (col//{k}, row//{k}) = {tuple(expected[i])}; the store's pack grid "
                f"does not match pack_size={k}"
            )
    return build_slide_batch(
        sf.patch_features,
        sf.patch_grid,
        pack_features=sf.pack_features,
        pack_grid=sf.pack_grid,
        global_feature=sf.global_feature,
        pack_size=k,
        slide_id=sf.slide_id,
    )


def _pad_dim(t: Tensor, dim: int, size: int, value: float | int | bool = 0) -> Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=dim)


def collate_batches(batches: Sequence[TopoPackBatch]) -> TopoPackBatch:
    """Stack batches into one, padding packs (and absent feature widths) with invalid zeros."""
    if not batches:
        raise ValueError("collate_batches needs at least one batch")
    k = batches[0].pack_size
    if any(b.pack_size != k for b in batches):
        raise TopoPackBatchError("cannot collate slides with different pack sizes")
    dims = {b.patch_features.shape[-1] for b in batches}
    if len(dims) != 1:
        raise TopoPackBatchError(f"cannot collate slides with different patch feature widths {sorted(dims)}")
    p_max = max(b.num_packs for b in batches)
    dp = max(b.pack_features.shape[-1] for b in batches)
    dg = max(b.global_feature.shape[-1] for b in batches)
    for name, width, get in (("pack", dp, lambda b: b.pack_features), ("global", dg, lambda b: b.global_feature)):
        widths = {get(b).shape[-1] for b in batches} - {0}
        if len(widths) > 1:
            raise TopoPackBatchError(f"cannot collate slides with different {name} feature widths {sorted(widths)}")

    def cat(name: str, value: float | int | bool = 0, width: int | None = None) -> Tensor:
        parts = []
        for b in batches:
            t = getattr(b, name)
            if width is not None and t.shape[-1] == 0 and width > 0:
                t = torch.zeros(*t.shape[:-1], width, dtype=t.dtype, device=t.device)
            if t.dim() >= 2 and name != "global_feature":
                t = _pad_dim(t, 1, p_max, value)
            parts.append(t)
        return torch.cat(parts, dim=0)

    return TopoPackBatch(
        pack_size=k,
        patch_features=cat("patch_features"),
        patch_valid=cat("patch_valid", False),
        patch_index=cat("patch_index", -1),
        pack_features=cat("pack_features", width=dp),
        pack_present=cat("pack_present", False),
        pack_valid=cat("pack_valid", False),
        pack_grid=cat("pack_grid"),
        pack_origin=cat("pack_origin"),
        pack_index=cat("pack_index", -1),
        global_feature=cat("global_feature", width=dg),
        global_present=cat("global_present"),
        slide_ids=tuple(s for b in batches for s in b.slide_ids),
    )
