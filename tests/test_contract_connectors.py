"""The contract every registered connector keeps, checked for each entry of the registry.

A connector added with ``@CONNECTORS.register(NAME)`` is picked up here without editing
this file, alone and reading patch features, and with pooled tokens where it declares
``pools_tokens``: its output has the LLM's width, as many valid rows per slide as
``output_length`` says, comes back identical from its saved config and weights, and
padded (masked) tokens and patches cannot change it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slidevl.slidellm.connector import CONNECTORS, Connector, ConnectorConfig, build_connector, list_connectors

DIM, WIDTH, PATCH = 12, 20, 7
TOKENS, PATCHES = [7, 3], [4, 2]  # per slide of a batch of two
CASES = [(kind, patch_dim, pooled) for kind, cls in CONNECTORS.items() for patch_dim in (0, PATCH)
         for pooled in ((False, True) if cls.pools_tokens else (False,))]
IDS = [f"{kind}{'-patches' if patch_dim else ''}{'-pooled' if pooled else ''}" for kind, patch_dim, pooled in CASES]


def _config(kind: str, patch_dim: int = 0, pooled: bool = False) -> ConnectorConfig:
    return ConnectorConfig(vision_dim=DIM, llm_dim=WIDTH, kind=kind, num_queries=5, hidden_size=16, num_layers=1, num_heads=4,
                           intermediate_size=32, dropout=0.0, patch_dim=patch_dim, pooled_tokens=pooled)


def _padded(counts: list[int], dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max count, dim) rows with garbage (huge, inf, NaN) in the padding, and the (B, max count) mask."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(counts), max(counts), dim, generator=g)
    valid = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
    rows[~valid] = 1e4
    rows[~valid, 0] = float("inf")
    rows[~valid, -1] = float("nan")
    return rows, valid


def _fitted(kind: str, patch_dim: int, pooled: bool) -> Connector:
    """A connector with fitted standardisers, so its buffers are not their defaults."""
    torch.manual_seed(0)
    conn = build_connector(_config(kind, patch_dim, pooled)).eval()
    conn.standardize.fit(torch.randn(50, DIM) * 3 + 2)
    if patch_dim:
        conn.patch_standardize.fit(torch.randn(50, patch_dim) * torch.logspace(-1, 1, patch_dim) + 1)
    return conn


def _inputs(patch_dim: int) -> tuple:
    tokens, valid = _padded(TOKENS, DIM, seed=1)
    if not patch_dim:
        return tokens, valid
    return (tokens, valid, *_padded(PATCHES, patch_dim, seed=2))


def test_every_connector_is_listed_and_named_kinds_are_checked() -> None:
    assert list_connectors() == CONNECTORS.names() and {"qformer", "mlp"} <= set(list_connectors())
    for kind, cls in CONNECTORS.items():
        assert issubclass(cls, Connector), f"{kind} must derive from Connector"
    with pytest.raises(ValueError, match=re.escape(f"connector kind must be one of {list_connectors()}, got 'perceiver'")):
        _config("perceiver")
    for kind, cls in CONNECTORS.items():
        if not cls.pools_tokens:
            with pytest.raises(ValueError, match=f"pooled_tokens applies to the .* connector, not to {kind}"):
                _config(kind, pooled=True)


@pytest.mark.parametrize(("kind", "patch_dim", "pooled"), CASES, ids=IDS)
def test_output_shapes_follow_output_length(kind: str, patch_dim: int, pooled: bool) -> None:
    conn = _fitted(kind, patch_dim, pooled)
    out = conn(*_inputs(patch_dim))
    n_patches = PATCHES if patch_dim else [0, 0]
    assert out.embeds.shape == (2, conn.output_length(max(TOKENS), max(n_patches)), WIDTH)
    assert out.valid.shape == out.embeds.shape[:2] and out.valid.dtype == torch.bool
    assert out.valid.sum(1).tolist() == [conn.output_length(t, n) for t, n in zip(TOKENS, n_patches)]
    assert bool(torch.isfinite(out.embeds[out.valid]).all()), "garbage in the padding reached a valid row"


@pytest.mark.parametrize(("kind", "patch_dim", "pooled"), CASES, ids=IDS)
def test_masked_tokens_do_not_change_the_output(kind: str, patch_dim: int, pooled: bool) -> None:
    conn = _fitted(kind, patch_dim, pooled)
    padded = conn(*_inputs(patch_dim))
    # The second slide alone, without any padding, must give what its valid rows gave in the batch.
    tokens, valid = _inputs(patch_dim)[:2]
    alone_inputs: tuple = (tokens[1:, :TOKENS[1]], valid[1:, :TOKENS[1]])
    if patch_dim:
        patches, patch_valid = _inputs(patch_dim)[2:]
        alone_inputs += (patches[1:, :PATCHES[1]], patch_valid[1:, :PATCHES[1]])
    alone = conn(*alone_inputs)
    assert alone.valid.all()
    torch.testing.assert_close(padded.embeds[1][padded.valid[1]], alone.embeds[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "patch_dim", "pooled"), CASES, ids=IDS)
def test_saved_config_and_weights_give_identical_outputs(kind: str, patch_dim: int, pooled: bool, tmp_path: Path) -> None:
    conn = _fitted(kind, patch_dim, pooled)
    (tmp_path / "connector.json").write_text(json.dumps(conn.config.to_dict()))
    save_file({k: v.contiguous() for k, v in conn.state_dict().items()}, str(tmp_path / "connector.safetensors"))
    reloaded = build_connector(ConnectorConfig.from_dict(json.loads((tmp_path / "connector.json").read_text()))).eval()
    assert type(reloaded) is type(conn) and reloaded.config == conn.config
    reloaded.load_state_dict(load_file(str(tmp_path / "connector.safetensors")))
    a, b = conn(*_inputs(patch_dim)), reloaded(*_inputs(patch_dim))
    assert torch.equal(a.valid, b.valid) and torch.equal(a.embeds, b.embeds)
