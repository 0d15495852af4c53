"""Per-slide arrays → TopoPackBatch: packs, slots, missing summaries, padding, the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidevl.slidellm.encoder import (
    TopoPackBatchError,
    batch_from_slide_features,
    build_slide_batch,
    collate_batches,
    sincos_2d,
)
from slidevl.slidellm.encoder.posenc import relative_grid


def _feats(n: int, d: int = 4) -> np.ndarray:
    # feature row i is filled with i, so it is easy to see where each patch landed
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1)


def test_pack_and_slot_assignment() -> None:
    grid = np.array([[4, 7], [0, 0], [2, 2], [3, 0], [8, 8]])  # (col, row)
    b = build_slide_batch(_feats(5), grid, pack_size=3, slide_id="s")
    # packs in raster order (row, then col): (0,0), (1,0), (1,2), (2,2)
    assert b.pack_grid[0].tolist() == [[0, 0], [1, 0], [1, 2], [2, 2]]
    assert b.num_tokens == 4 * 10 + 1
    # patch 0 at (4,7): pack (1,2), slot (7%3)*3 + 4%3 = 4
    assert b.patch_index[0, 2].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1, -1]
    assert b.patch_features[0, 2, 4, 0] == 0.0 and b.patch_valid[0, 2, 4]
    # patch 2 at (2,2): pack (0,0), slot 8; patch 1 at (0,0): slot 0
    assert b.patch_index[0, 0, 8] == 2 and b.patch_index[0, 0, 0] == 1
    # patch 3 at (3,0): pack (1,0), slot 0; patch 4 at (8,8): pack (2,2), slot 8
    assert b.patch_index[0, 1, 0] == 3 and b.patch_index[0, 3, 8] == 4
    assert int(b.patch_valid.sum()) == 5
    assert torch.equal(b.patch_features[b.patch_valid][:, 0], torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]))
    assert not b.pack_present.any() and b.pack_features.shape[-1] == 0
    assert not b.global_present.any()


def test_missing_summaries_and_summary_only_packs() -> None:
    grid = np.array([[0, 0], [1, 1], [3, 0]])
    pack_grid = np.array([[5, 5], [0, 0]])  # pack (1,0) has no summary; (5,5) has no patches
    pack_feats = np.array([[7.0, 7.0], [9.0, 9.0]], np.float32)
    b = build_slide_batch(_feats(3), grid, pack_features=pack_feats, pack_grid=pack_grid, global_feature=np.ones(3), slide_id="s")
    assert b.pack_grid[0].tolist() == [[0, 0], [1, 0], [5, 5]]
    assert b.pack_present[0].tolist() == [True, False, True]
    assert b.pack_index[0].tolist() == [1, -1, 0]
    assert b.pack_features[0, :, 0].tolist() == [9.0, 0.0, 7.0]
    assert b.patch_valid[0, 2].sum() == 0 and b.pack_valid[0].all()
    assert b.global_present[0] and b.global_feature.shape == (1, 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(patch_grid=np.array([[0, 0], [0, 0]])), "share pack"),
        (dict(pack_features=np.zeros((1, 2))), "without pack_grid"),
        (dict(pack_grid=np.array([[0, 0], [0, 0]])), "same pack twice"),
        (dict(patch_grid=np.array([[0.5, 0], [1, 0]])), "integer"),
    ],
)
def test_bad_arrays_raise_clear_errors(kwargs, message: str) -> None:
    args = dict(patch_features=_feats(2), patch_grid=np.array([[0, 0], [1, 0]]))
    args.update(kwargs)
    with pytest.raises(TopoPackBatchError, match=message):
        build_slide_batch(args.pop("patch_features"), args.pop("patch_grid"), slide_id="bad", **args)


def test_collate_pads_packs_and_split_undoes_it() -> None:
    a = build_slide_batch(_feats(6), np.array([[c, r] for c in range(3) for r in range(2)]) * 2, pack_features=None, slide_id="a")
    b = build_slide_batch(
        _feats(2), np.array([[0, 0], [1, 0]]), pack_features=np.ones((1, 5)), pack_grid=np.array([[0, 0]]), global_feature=np.ones(2), slide_id="b"
    )
    batch = collate_batches([a, b])
    assert batch.batch_size == 2 and batch.num_packs == a.num_packs
    assert batch.pack_valid.sum(1).tolist() == [a.num_packs, 1]
    assert batch.pack_features.shape[-1] == 5 and not batch.pack_present[0].any()
    assert batch.global_feature.shape == (2, 2) and batch.global_present.tolist() == [False, True]
    assert not batch.patch_valid[1, 1:].any()
    a2, b2 = batch.split()
    assert torch.equal(a2.patch_features, a.patch_features) and torch.equal(b2.patch_index, b.patch_index)
    assert a2.slide_ids == ("a",) and b2.num_packs == 1


def test_collate_rejects_mixed_widths() -> None:
    a = build_slide_batch(_feats(1, 4), np.array([[0, 0]]))
    b = build_slide_batch(_feats(1, 5), np.array([[0, 0]]))
    with pytest.raises(TopoPackBatchError, match="patch feature widths"):
        collate_batches([a, b])


def _slide_features(pack_size: int = 3):
    from slidevl.features.store import SlideFeatures

    rng = np.random.default_rng(0)
    grid = np.array([[c, r] for r in range(5) for c in range(7) if (c + r) % 4], np.int64)
    pack_grid = np.unique(grid // pack_size, axis=0)
    lookup = {tuple(p): i for i, p in enumerate(pack_grid)}
    return SlideFeatures(
        slide_id="slide-1",
        patch_features=rng.normal(size=(len(grid), 6)).astype(np.float32),
        patch_coords=grid * 256,
        patch_grid=grid,
        patch_region=np.zeros(len(grid), np.int64),
        patch_pack=np.array([lookup[tuple(g)] for g in grid // pack_size], np.int64),
        patch_tissue=np.ones(len(grid), np.float32),
        pack_features=rng.normal(size=(len(pack_grid), 5)).astype(np.float32),
        pack_coords=pack_grid * 256 * pack_size,
        pack_grid=pack_grid,
        global_feature=rng.normal(size=3).astype(np.float32),
        attrs={"pack_size": pack_size},
    )


def test_batch_from_feature_store_roundtrip(tmp_path) -> None:
    from slidevl.features.store import FeatureStore

    sf = _slide_features()
    store = FeatureStore(tmp_path, encoder="toy")
    store.write(sf, float16=False)
    loaded = FeatureStore(tmp_path).load("slide-1")
    b = batch_from_slide_features(loaded)
    assert b.slide_ids == ("slide-1",)
    assert int(b.patch_valid.sum()) == sf.n_patches and b.pack_present.all()
    # every patch row lands in the slot its grid position names, with its own features
    for p in range(b.num_packs):
        for s in range(9):
            i = int(b.patch_index[0, p, s])
            if i < 0:
                continue
            col, row = sf.patch_grid[i]
            assert tuple(b.pack_grid[0, p].tolist()) == (col // 3, row // 3)
            assert s == (row % 3) * 3 + col % 3
            np.testing.assert_array_equal(b.patch_features[0, p, s].numpy(), sf.patch_features[i])
    np.testing.assert_array_equal(b.pack_features[0].numpy(), sf.pack_features[b.pack_index[0].numpy()])


def test_store_pack_index_must_agree_with_grid() -> None:
    sf = _slide_features()
    sf.patch_pack = (sf.patch_pack + 1) % len(sf.pack_grid)
    with pytest.raises(TopoPackBatchError, match="does not match pack_size"):
        batch_from_slide_features(sf)


def test_sincos_2d_and_relative_grid() -> None:
    grid = torch.tensor([[[3, 4], [5, 4], [9, 9]]])
    valid = torch.tensor([[True, True, False]])
    rel = relative_grid(grid, valid)
    assert rel[0, :2].tolist() == [[0, 0], [2, 0]]
    code = sincos_2d(rel, 16)
    assert code.shape == (1, 3, 16)
    # origin: sin parts 0, cos parts 1, for both axes
    assert torch.allclose(code[0, 0], torch.tensor(([0.0] * 4 + [1.0] * 4) * 2))
    # same row, different column: row half equal, column half different
    assert torch.allclose(code[0, 0, 8:], code[0, 1, 8:]) and not torch.allclose(code[0, 0, :8], code[0, 1, :8])
