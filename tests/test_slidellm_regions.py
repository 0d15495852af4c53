"""Region questions: level-0 bbox → the packs under it (plus the global token)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_slidellm_fixtures import FEATURE_DIM, slide_features

from slidevl.slidellm.encoder import TopoPackConfig, TopoPackEncoder, batch_from_slide_features
from slidevl.slidellm.model import (
    SlideVLMError,
    VisualTokens,
    encode_slide,
    parse_bbox,
    patch_step_level0,
    slide_pack_boxes,
)


def _visual(boxes: list[list[int]], dim: int = 3) -> VisualTokens:
    p = len(boxes)
    summary = torch.arange(p, dtype=torch.float32)[:, None].repeat(1, dim)
    return VisualTokens("S", summary, torch.full((dim,), -1.0), torch.tensor(boxes, dtype=torch.int64))


def test_bbox_selects_intersecting_packs_and_keeps_the_global_token() -> None:
    vt = _visual([[0, 0, 768, 768], [768, 0, 1536, 768], [0, 768, 768, 1536], [768, 768, 1536, 1536]])
    assert vt.packs_in((700, 700, 800, 800)).tolist() == [0, 1, 2, 3]
    assert vt.packs_in((800, 10, 900, 20)).tolist() == [1]
    # Exclusive ends: a box ending exactly on a pack edge does not touch the next pack.
    assert vt.packs_in((0, 0, 768, 768)).tolist() == [0]
    tokens = vt.select((800, 800, 900, 900))
    assert tokens[:, 0].tolist() == [3.0, -1.0]  # pack 3, then the global token
    assert vt.select((800, 800, 900, 900), use_global=False)[:, 0].tolist() == [3.0]
    assert vt.select(None)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, -1.0]


def test_bbox_over_no_pack_is_a_clear_error() -> None:
    vt = _visual([[0, 0, 768, 768]])
    with pytest.raises(SlideVLMError, match="intersects no tissue pack"):
        vt.select((5000, 5000, 6000, 6000))


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.2527])
@pytest.mark.parametrize("recorded", [True, False])
def test_pack_boxes_follow_the_grid_at_any_scan_resolution(mpp: float, recorded: bool) -> None:
    sf = slide_features("S", 7, 5, mpp=mpp, drop=2)
    step = 256 * 0.5 / mpp
    if recorded:  # what `slidevl preprocess` writes; imported stores lack it and the step is fitted
        sf.attrs["patch_size_level0"] = step
    assert patch_step_level0(sf) == pytest.approx(step, abs=0.5 / 6)
    boxes = slide_pack_boxes(sf)
    origin = batch_from_slide_features(sf).pack_origin[0].numpy()
    expected = np.concatenate([np.rint(origin * 3 * step), np.rint((origin + 1) * 3 * step)], axis=1)
    np.testing.assert_allclose(boxes.numpy(), expected, atol=0 if recorded else 1)
    # Every patch lies inside the box of its pack, in the encoder's pack order.
    patch_boxes = np.concatenate([sf.patch_coords, np.rint((sf.patch_grid + 1) * step)], axis=1)
    pack_of_patch = {tuple(o): i for i, o in enumerate(origin)}
    slack = 0 if recorded else 1
    for grid, pbox in zip(sf.patch_grid, patch_boxes):
        box = boxes[pack_of_patch[(grid[0] // 3, grid[1] // 3)]].numpy()
        assert box[0] <= pbox[0] + slack and box[1] <= pbox[1] + slack
        assert pbox[2] <= box[2] + slack and pbox[3] <= box[3] + slack


def test_coords_off_the_lattice_are_rejected() -> None:
    sf = slide_features("S", 4, 4)
    sf.patch_coords = sf.patch_coords + np.array([[40, 0]])
    with pytest.raises(SlideVLMError, match="regular lattice"):
        patch_step_level0(sf)
    sf = slide_features("S", 4, 4)
    sf.attrs["patch_size_level0"] = 300.0  # disagrees with the coords (256 px patches)
    with pytest.raises(SlideVLMError, match="regular lattice"):
        patch_step_level0(sf)


def test_parse_bbox() -> None:
    assert parse_bbox("0, 10,300,400") == (0, 10, 300, 400)
    for bad in ("1,2,3", "a,b,c,d", "10,0,5,5", "-1,0,5,5"):
        with pytest.raises(SlideVLMError):
            parse_bbox(bad)


def test_patches_under_a_box_and_the_thinning_of_many() -> None:
    vt = _visual([[0, 0, 768, 768]])
    coords = torch.tensor([[x, y] for y in range(0, 768, 256) for x in range(0, 768, 256)], dtype=torch.int64)
    vt = VisualTokens("S", vt.summary, vt.global_token, vt.pack_boxes, torch.arange(9.0)[:, None], torch.cat([coords, coords + 256], 1))
    assert vt.patches_in((0, 0, 256, 256))[:, 0].tolist() == [0.0]
    assert vt.patches_in((300, 300, 500, 500))[:, 0].tolist() == [4.0]
    assert vt.patches_in((300, 300, 600, 600))[:, 0].tolist() == [4.0, 5.0, 7.0, 8.0]
    assert vt.patches_in(None)[:, 0].tolist() == [float(i) for i in range(9)]
    # Thinned evenly, keeping both ends.
    assert vt.patches_in(None, limit=3)[:, 0].tolist() == [0.0, 4.0, 8.0]
    with pytest.raises(SlideVLMError, match="no patch features"):
        _visual([[0, 0, 768, 768]]).patches_in(None)


def test_encoded_slides_keep_half_precision_patch_features_and_widen_what_a_question_reads() -> None:
    sf = slide_features("S", 4, 4)
    sf.patch_features = sf.patch_features.astype(np.float16)  # what the store writes by default
    encoder = TopoPackEncoder(TopoPackConfig(patch_dim=FEATURE_DIM, pack_dim=FEATURE_DIM, global_dim=FEATURE_DIM, d_model=8,
                                             n_layers=1, n_heads=2, ffn_dim=16, attention_impl="gather"))
    with torch.no_grad():
        vt = encode_slide(encoder, sf)
    assert vt.patch_features is not None and vt.patch_features.dtype == torch.float16
    read = vt.patches_in(None)
    assert read.dtype == torch.float32
    assert torch.equal(read, torch.from_numpy(sf.patch_features.astype(np.float32)))
