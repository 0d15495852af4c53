"""Small synthetic feature slides for tests, benchmarks and smoke runs of the encoder.

Features are drawn around per-class prototypes on a blobby class map over the patch
grid, so neighbouring patches and packs are correlated the way tissue regions are and a
masked-feature objective has something to learn. This works at the feature level only;
full synthetic cohorts with images and planted ground truth live in :mod:`slidevl.synth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidevl.slidellm.encoder.batch import TopoPackBatch, build_slide_batch


@dataclass
class SyntheticSlide:
    """A synthetic slide: its batch, and the class of every patch and pack."""

    batch: TopoPackBatch
    patch_grid: np.ndarray  # (N, 2)
    patch_class: np.ndarray  # (N,)
    pack_grid: np.ndarray  # (P, 2)
    pack_class: np.ndarray  # (P,) majority class of the pack's patches


def _class_map(cols: int, rows: int, n_classes: int, rng: np.random.Generator, blobs: int) -> np.ndarray:
    # Nearest-seed (Voronoi) regions: contiguous areas of one class, like tissue regions.
    seeds = rng.uniform([0, 0], [cols, rows], size=(blobs, 2))
    seed_class = rng.integers(0, n_classes, size=blobs)
    cc, rr = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
    d = (cc[..., None] - seeds[:, 0]) ** 2 + (rr[..., None] - seeds[:, 1]) ** 2
    return seed_class[d.argmin(-1)]  # (rows, cols)


def synthetic_slide(
    cols: int,
    rows: int,
    *,
    patch_dim: int = 32,
    pack_dim: int = 24,
    global_dim: int = 16,
    pack_size: int = 3,
    n_classes: int = 4,
    tissue_fraction: float = 0.85,
    summary_fraction: float = 0.9,
    noise: float = 0.5,
    seed: int = 0,
    slide_id: str | None = None,
    prototypes_seed: int = 1234,
) -> SyntheticSlide:
    """One slide of ``cols`` × ``rows`` patches with class-structured features.

    Class prototypes depend only on ``prototypes_seed``, so slides made with different
    ``seed`` share the meaning of each class (as real slides share tissue types).
    ``tissue_fraction`` of the patches exist; ``summary_fraction`` of the packs have a
    summary feature (the others exercise the "missing summary" path).
    """
    rng = np.random.default_rng(seed)
    proto_rng = np.random.default_rng(prototypes_seed)
    patch_proto = proto_rng.normal(size=(n_classes, patch_dim)).astype(np.float32)
    pack_proj = proto_rng.normal(size=(patch_dim, pack_dim)).astype(np.float32) / np.sqrt(patch_dim)
    glob_proj = proto_rng.normal(size=(patch_dim, global_dim)).astype(np.float32) / np.sqrt(patch_dim)

    cmap = _class_map(cols, rows, n_classes, rng, blobs=max(2, (cols * rows) // 60))
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
    grid = np.stack([cc.ravel(), rr.ravel()], axis=1).astype(np.int64)
    klass = cmap.ravel()
    keep = rng.random(len(grid)) < tissue_fraction
    if not keep.any():
        keep[rng.integers(len(grid))] = True
    grid, klass = grid[keep], klass[keep]
    feats = patch_proto[klass] + noise * rng.normal(size=(len(grid), patch_dim)).astype(np.float32)

    packs, inverse = np.unique(grid // pack_size, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.zeros((len(packs), n_classes), np.int64)
    np.add.at(counts, (inverse, klass), 1)
    pack_class = counts.argmax(1)
    pack_mean = np.zeros((len(packs), patch_dim), np.float32)
    np.add.at(pack_mean, inverse, feats)
    pack_mean /= counts.sum(1, keepdims=True)
    has_summary = rng.random(len(packs)) < summary_fraction
    pack_feats = (pack_mean @ pack_proj + 0.1 * rng.normal(size=(len(packs), pack_dim))).astype(np.float32)
    glob = (feats.mean(0) @ glob_proj).astype(np.float32)
    sid = slide_id if slide_id is not None else f"synthetic-{seed}"
    batch = build_slide_batch(
        feats,
        grid,
        pack_features=pack_feats[has_summary] if pack_dim else None,
        pack_grid=packs[has_summary] if pack_dim else None,
        global_feature=glob if global_dim else None,
        pack_size=pack_size,
        slide_id=sid,
    )
    return SyntheticSlide(batch=batch, patch_grid=grid, patch_class=klass, pack_grid=packs, pack_class=pack_class)


def full_pack_batch(n_packs: int, dim: int, *, pack_size: int = 3, seed: int = 0, pack_dim: int | None = None, global_dim: int | None = None) -> TopoPackBatch:
    """A slide of ``n_packs`` completely filled packs on a near-square grid (benchmarks)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_packs)))
    pc = np.stack([np.arange(n_packs) % side, np.arange(n_packs) // side], axis=1).astype(np.int64)
    s = pack_size * pack_size
    slot = np.arange(s)
    grid = (pc[:, None, :] * pack_size + np.stack([slot % pack_size, slot // pack_size], axis=1)[None]).reshape(-1, 2)
    pack_dim = dim if pack_dim is None else pack_dim
    global_dim = dim if global_dim is None else global_dim
    return build_slide_batch(
        rng.standard_normal((len(grid), dim), dtype=np.float32),
        grid,
        pack_features=rng.standard_normal((n_packs, pack_dim), dtype=np.float32),
        pack_grid=pc,
        global_feature=rng.standard_normal(global_dim, dtype=np.float32),
        pack_size=pack_size,
        slide_id=f"full-{n_packs}",
    )
