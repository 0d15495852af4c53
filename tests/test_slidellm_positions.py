"""Connector positions: each summary token and patch placed in the tissue in view, and what that adds."""

from __future__ import annotations

import math

import pytest
import torch

from slidevl.slidellm.connector import ConnectorConfig, PositionEncoding, build_connector
from slidevl.slidellm.model import VisualTokens, batch_connector_inputs, connector_input

DIM, WIDTH, PATCH = 6, 10, 4


def _slide() -> VisualTokens:
    """Two packs side by side; 256 px patches on five columns (x 256..1536) and three rows: no tissue at x < 256."""
    packs = torch.tensor([[0, 0, 768, 768], [768, 0, 1536, 768]])
    coords = torch.tensor([[x, y] for y in range(0, 768, 256) for x in range(256, 1536, 256)])
    features = torch.arange(float(len(coords)))[:, None].repeat(1, PATCH)
    return VisualTokens("S", torch.randn(2, DIM), torch.randn(DIM), packs, features, torch.cat([coords, coords + 256], 1))


def _close(got: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype))


def _config(kind: str = "mlp", **kw: object) -> ConnectorConfig:
    base = dict(vision_dim=DIM, llm_dim=WIDTH, kind=kind, num_queries=3, hidden_size=8, num_layers=1, num_heads=2,
                intermediate_size=16, dropout=0.0, patch_dim=PATCH, positions=True)
    base.update(kw)
    return ConnectorConfig(**base)  # type: ignore[arg-type]


def test_whole_slide_places_are_fractions_of_the_tissue_extent() -> None:
    vt = _slide()
    token_xy, patch_xy = vt.positions_in(None)
    # The frame is the patches' extent, x 256..1536 and y 0..768, not the packs' (x from 0).
    _close(token_xy[:2], [[0.1, 0.5], [0.7, 0.5]])
    assert torch.isnan(token_xy[2]).all()  # the global token has no place
    assert patch_xy is not None and patch_xy.shape == (15, 2)
    _close(patch_xy[0], [0.1, 1 / 6])  # centre (384, 128)
    _close(patch_xy[-1], [0.9, 5 / 6])  # centre (1408, 640)
    assert vt.positions_in(None, use_global=False)[0].shape == (2, 2)


def test_a_box_is_its_own_frame_and_places_follow_the_thinned_patches() -> None:
    vt = _slide()
    box = (768, 0, 1536, 384)  # pack 1 only (ends are exclusive); patches of columns 3-5, rows 0-1
    token_xy, patch_xy = vt.positions_in(box)
    assert vt.select(box).shape[0] == token_xy.shape[0] == 2
    # Frame x 768..1536, y 0..384 (the row-1 patches reach y 512 and are clipped): pack 1's centre (1152, 384).
    _close(token_xy[0], [0.5, 1.0])
    assert patch_xy is not None
    _close(patch_xy, [[1 / 6, 1 / 3], [0.5, 1 / 3], [5 / 6, 1 / 3],
                                               [1 / 6, 1.0], [0.5, 1.0], [5 / 6, 1.0]])
    # Thinning keeps the place of every patch it keeps: patch i's feature is i.
    rows = vt.patches_in(None, limit=4)[:, 0].long()
    _, thinned = vt.positions_in(None, limit=4)
    _, every = vt.positions_in(None)
    assert thinned is not None and every is not None and torch.equal(thinned, every[rows])


def test_position_encoding_starts_at_zero_and_leaves_unplaced_rows_alone() -> None:
    encoding = PositionEncoding(WIDTH, bands=3)
    xy = torch.tensor([[[0.1, 0.2], [0.9, 0.5], [math.nan, math.nan]]])
    assert torch.equal(encoding(xy), torch.zeros(1, 3, WIDTH))
    torch.nn.init.normal_(encoding.proj.weight)
    out = encoding(xy)
    assert torch.equal(out[0, 2], torch.zeros(WIDTH))
    assert not torch.allclose(out[0, 0], out[0, 1])


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_positions_change_the_output_only_once_trained(kind: str) -> None:
    torch.manual_seed(0)
    vt, box = _slide(), (256, 0, 1536, 768)
    placed = build_connector(_config(kind)).eval()
    plain = build_connector(_config(kind, positions=False)).eval()
    plain.load_state_dict({k: v for k, v in placed.state_dict().items() if not k.startswith("position.")})
    batch = batch_connector_inputs(placed.config, [connector_input(placed.config, vt, box), connector_input(placed.config, vt)])
    assert batch.token_xy is not None and batch.token_xy.shape == (*batch.tokens.shape[:2], 2)
    assert batch.patch_xy is not None and batch.patch_xy.shape == (*batch.patches.shape[:2], 2)
    assert torch.equal(placed(*batch).embeds, plain(*batch[:4]).embeds)  # a zero map adds nothing
    with torch.no_grad():
        torch.nn.init.normal_(placed.position.proj.weight)
    moved = placed(*batch).embeds != plain(*batch[:4]).embeds
    assert moved.any()
    if kind == "mlp":  # one output row per input: two packs, the global token, which stays put, then the patches
        assert moved[0, :2].all() and not moved[0, 2].any() and moved[0, 3].all()


def test_positions_must_come_when_read_and_only_then() -> None:
    vt = _slide()
    placed = build_connector(_config()).eval()
    batch = batch_connector_inputs(placed.config, [connector_input(placed.config, vt)])
    with pytest.raises(ValueError, match="reads positions"):
        placed(*batch[:4])
    with pytest.raises(ValueError, match="reads no positions"):
        build_connector(_config(positions=False))(*batch)
