"""Feature-level augmentation: symmetries move packs and slots together; crops; noise."""

from __future__ import annotations

import pytest
import torch

from slidevl.slidellm.encoder.synthetic import synthetic_slide
from slidevl.slidellm.pretrain import add_feature_noise, crop_window, dihedral_transform, random_crop
from slidevl.slidellm.pretrain.augment import transform_patch_grid


def _absolute_positions(batch) -> dict[int, tuple[int, int]]:
    """patch row index → absolute (col, row) implied by its pack position and slot."""
    k = batch.pack_size
    out = {}
    for p in range(batch.num_packs):
        for s in range(k * k):
            i = int(batch.patch_index[0, p, s])
            if i >= 0:
                c, r = batch.pack_grid[0, p].tolist()
                out[i] = (c * k + s % k, r * k + s // k)
    return out


@pytest.mark.parametrize("t", range(8))
def test_symmetry_moves_packs_and_slots_consistently(t: int) -> None:
    slide = synthetic_slide(10, 7, seed=1, tissue_fraction=0.8)
    batch = slide.batch
    before = _absolute_positions(batch)
    after = _absolute_positions(dihedral_transform(batch, t))
    idx = sorted(before)
    assert sorted(after) == idx
    orig = torch.tensor([before[i] for i in idx])
    moved = transform_patch_grid(orig, batch.pack_size, t)
    got = torch.tensor([after[i] for i in idx])
    shift = got - moved
    # the whole lattice moved rigidly, by a whole number of packs
    assert (shift == shift[0]).all() and (shift[0] % batch.pack_size == 0).all()
    # features follow their patch
    out = dihedral_transform(batch, t)
    for p in range(out.num_packs):
        for s in range(9):
            i = int(out.patch_index[0, p, s])
            if i >= 0:
                assert torch.equal(out.patch_features[0, p, s], batch.patch_features[batch.patch_index == i][0])
    assert torch.equal(out.pack_origin, batch.pack_origin)
    assert int(out.pack_grid[0].amin(0).min()) == 0


def test_the_eight_symmetries_are_distinct_and_close_under_composition() -> None:
    batch = synthetic_slide(10, 7, seed=2).batch
    layouts = {tuple(map(tuple, dihedral_transform(batch, t).pack_grid[0].tolist())) for t in range(8)}
    assert len(layouts) == 8
    rot = batch
    for _ in range(4):
        rot = dihedral_transform(rot, 1)
    assert torch.equal(rot.pack_grid, batch.pack_grid) and torch.equal(rot.patch_features, batch.patch_features)
    flip2 = dihedral_transform(dihedral_transform(batch, 4), 4)
    assert torch.equal(flip2.patch_index, batch.patch_index)


def test_crop_window_keeps_exactly_the_packs_inside() -> None:
    batch = synthetic_slide(12, 12, seed=3).batch
    out = crop_window(batch, 1, 1, 2, 3)
    g = out.pack_grid[0]
    assert ((g[:, 0] >= 1) & (g[:, 0] < 3) & (g[:, 1] >= 1) & (g[:, 1] < 4)).all()
    src = batch.pack_grid[0]
    expect = (src[:, 0] >= 1) & (src[:, 0] < 3) & (src[:, 1] >= 1) & (src[:, 1] < 4)
    assert 0 < out.num_packs == int(expect.sum())


def test_random_crop_is_a_nonempty_rectangle_within_the_budget() -> None:
    batch = synthetic_slide(30, 30, seed=4).batch
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = random_crop(batch, g, min_frac=0.3, max_frac=1.0, max_packs=25)
        assert 1 <= out.num_packs <= 25
        grid = out.pack_grid[0]
        lo, hi = grid.amin(0), grid.amax(0)
        inside = (batch.pack_grid[0] >= lo).all(1) & (batch.pack_grid[0] <= hi).all(1)
        assert int(inside.sum()) == out.num_packs  # every pack of the window was kept


def test_feature_noise_touches_only_real_entries() -> None:
    batch = synthetic_slide(7, 7, seed=5, tissue_fraction=0.6).batch
    out = add_feature_noise(batch, torch.Generator().manual_seed(0), 0.2)
    changed = (out.patch_features != batch.patch_features).any(-1)
    assert torch.equal(changed, batch.patch_valid)
    assert (out.pack_features[~batch.pack_present] == 0).all()
    ratio = (out.patch_features - batch.patch_features)[batch.patch_valid].std() / batch.patch_features[batch.patch_valid].std()
    assert 0.15 < float(ratio) < 0.25
