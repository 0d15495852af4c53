"""Mask semantics of the topo-pack encoder, checked on the boolean mask itself.

The expected visible sets are written out by enumeration here, independently of the
vectorised rule in ``slidevl.slidellm.encoder.mask``.
"""

from __future__ import annotations

import pytest
import torch

from slidevl.slidellm.encoder import GLOBAL, PATCH, SUMMARY, TokenLayout, dense_mask


def _layout() -> TokenLayout:
    # Two slides, 3 packs of 2x2 slots; slide 1 has a padded pack and empty slots.
    patch_valid = torch.tensor(
        [
            [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 0]],
            [[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]],
        ],
        dtype=torch.bool,
    )
    summary_valid = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return TokenLayout(2, patch_valid, summary_valid)


def _tokens(layout: TokenLayout, b: int) -> list[tuple[int, int, bool]]:
    """(type, pack, valid) of every token of slide ``b`` in sequence order."""
    out = []
    for p in range(layout.num_packs):
        for s in range(layout.slots):
            out.append((PATCH, p, bool(layout.patch_valid[b, p, s])))
    for p in range(layout.num_packs):
        out.append((SUMMARY, p, bool(layout.summary_valid[b, p])))
    out.append((GLOBAL, -1, True))
    return out


def _expected(layout: TokenLayout, b: int, variant: str) -> torch.Tensor:
    toks = _tokens(layout, b)
    n = len(toks)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, (qt, qp, _) in enumerate(toks):
        for j, (kt, kp, kv) in enumerate(toks):
            if not kv:
                continue
            if variant == "dense":
                ok = True
            elif qt == GLOBAL:
                ok = kt == GLOBAL
            elif qt == PATCH:
                ok = (kt == PATCH and kp == qp) or kt == GLOBAL or (variant == "patch_sees_summary" and kt == SUMMARY and kp == qp)
            else:
                ok = (kt == PATCH and kp == qp) or kt == SUMMARY or kt == GLOBAL
            m[i, j] = ok
    return m


@pytest.mark.parametrize("variant", ["topo", "patch_sees_summary", "dense"])
def test_dense_mask_matches_enumerated_rules(variant: str) -> None:
    layout = _layout()
    mask = dense_mask(layout, variant)
    assert mask.shape == (2, layout.num_tokens, layout.num_tokens)
    for b in range(2):
        assert torch.equal(mask[b], _expected(layout, b, variant)), f"slide {b}, variant {variant}"


def test_sequence_order_is_patches_then_summaries_then_global() -> None:
    layout = _layout()
    types = layout.token_type().tolist()
    packs = layout.token_pack().tolist()
    assert types == [PATCH] * 12 + [SUMMARY] * 3 + [GLOBAL]
    assert packs == [0] * 4 + [1] * 4 + [2] * 4 + [0, 1, 2, -1]


def test_topo_mask_per_token_type() -> None:
    layout = _layout()
    mask = dense_mask(layout, "topo")[0]
    n = layout.num_tokens
    glob = n - 1
    summaries = list(range(12, 15))
    # global -> itself only
    assert mask[glob].nonzero().flatten().tolist() == [glob]
    # patch (pack 1, slot 0) -> the valid patches of pack 1 + global; no summary
    assert mask[4].nonzero().flatten().tolist() == [4, 6, 7, glob]
    # summary of pack 1 -> pack 1's valid patches, all summaries (itself included), global
    assert mask[13].nonzero().flatten().tolist() == [4, 6, 7, *summaries, glob]
    # no token of another pack's patches is visible from a patch
    assert not mask[0, 4:12].any()


def test_padding_keys_are_never_visible() -> None:
    layout = _layout()
    valid = layout.token_valid()
    for variant in ("topo", "patch_sees_summary", "dense"):
        mask = dense_mask(layout, variant)
        for b in range(2):
            assert not mask[b][:, ~valid[b]].any(), variant
    # slide 1: pack 2 is padding, its summary and all its slots are invisible to everyone
    mask = dense_mask(layout, "topo")[1]
    assert not mask[:, 8:12].any() and not mask[:, 14].any()


def test_patch_sees_summary_adds_exactly_own_summary() -> None:
    layout = _layout()
    topo = dense_mask(layout, "topo")
    pss = dense_mask(layout, "patch_sees_summary")
    diff = pss & ~topo
    assert not (topo & ~pss).any()
    for b in range(2):
        for i, j in diff[b].nonzero().tolist():
            assert i < 12 and 12 <= j < 15 and j - 12 == i // 4
    # every patch of a pack with a valid summary gained exactly that summary
    assert int(diff[0].sum()) == 12
    assert int(diff[1].sum()) == 4  # slide 1: only pack 0's summary is valid


def test_every_query_row_keeps_the_global_key() -> None:
    layout = _layout()
    for variant in ("topo", "patch_sees_summary", "dense"):
        assert dense_mask(layout, variant)[:, :, -1].all()
