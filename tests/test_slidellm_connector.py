"""Connector shapes, and that padded encoder tokens cannot change what reaches the LLM."""

from __future__ import annotations

import pytest
import torch

from slidevl.slidellm.connector import ConnectorConfig, MLPConnector, QFormerConnector, TokenStandardizer, build_connector
from slidevl.slidellm.model import pad_visual

DIM, WIDTH = 12, 20


def _config(kind: str = "qformer", **kw: object) -> ConnectorConfig:
    base = dict(vision_dim=DIM, llm_dim=WIDTH, kind=kind, num_queries=5, hidden_size=16, num_layers=2, num_heads=4,
                intermediate_size=32, dropout=0.0, pooled_tokens=False)  # plain connectors; pooling is asked for by name
    base.update(kw)
    return ConnectorConfig(**base)  # type: ignore[arg-type]


def test_qformer_uses_blip2_with_cross_attention_in_every_layer() -> None:
    conn = QFormerConnector(_config(num_layers=3))
    assert conn.qformer.config.cross_attention_frequency == 1
    assert all(layer.has_cross_attention for layer in conn.qformer.encoder.layer)
    # Queries are the connector's own parameter, handed to the Q-Former as query_embeds.
    assert conn.queries.shape == (1, 5, 16)


@pytest.mark.parametrize("queries", [32, 500])
def test_qformer_output_is_fixed_length_at_llm_width(queries: int) -> None:
    conn = build_connector(_config(num_queries=queries)).eval()
    tokens, valid = pad_visual([torch.randn(7, DIM), torch.randn(3, DIM)])
    out = conn(tokens, valid)
    assert out.embeds.shape == (2, queries, WIDTH)
    assert out.valid.all()


def test_mlp_output_keeps_every_valid_token() -> None:
    conn = build_connector(_config("mlp")).eval()
    tokens, valid = pad_visual([torch.randn(7, DIM), torch.randn(3, DIM)])
    out = conn(tokens, valid)
    assert isinstance(conn, MLPConnector)
    assert out.embeds.shape == (2, 7, WIDTH)
    assert out.valid.sum(1).tolist() == [7, 3]


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_padded_tokens_do_not_change_the_output(kind: str) -> None:
    torch.manual_seed(0)
    conn = build_connector(_config(kind)).eval()
    short = torch.randn(1, 4, DIM)
    alone = conn(short, torch.ones(1, 4, dtype=torch.bool))
    # The same slide padded to 9 tokens, with garbage (huge values, inf, NaN) in the padding.
    garbage = torch.randn(1, 5, DIM) * 1e4
    garbage[0, 0, 0] = float("inf")
    garbage[0, 1, 1] = float("nan")
    padded = torch.cat([short, garbage], dim=1)
    valid = torch.tensor([[True] * 4 + [False] * 5])
    out = conn(padded, valid)
    n = alone.embeds.shape[1]
    torch.testing.assert_close(out.embeds[:, :n][out.valid[:, :n]], alone.embeds[alone.valid], rtol=1e-5, atol=1e-5)
    if kind == "qformer":
        assert out.embeds.shape == alone.embeds.shape


def test_padding_is_not_ignored_without_the_mask() -> None:
    # Guards the test above: the same padded input marked valid does change the Q-Former output.
    torch.manual_seed(0)
    conn = build_connector(_config()).eval()
    short = torch.randn(1, 4, DIM)
    padded = torch.cat([short, torch.randn(1, 5, DIM)], dim=1)
    a = conn(short, torch.ones(1, 4, dtype=torch.bool)).embeds
    b = conn(padded, torch.ones(1, 9, dtype=torch.bool)).embeds
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_inputs_and_configs_are_rejected() -> None:
    conn = build_connector(_config())
    with pytest.raises(ValueError, match="shape"):
        conn(torch.randn(1, 3, DIM + 1), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one valid"):
        conn(torch.randn(1, 3, DIM), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind"):
        _config("linear")
    with pytest.raises(ValueError, match="divisible"):
        _config(hidden_size=18, num_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        ConnectorConfig.from_dict({**_config().to_dict(), "extra": 1})


PATCH = 7


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_patch_features_join_the_tokens_and_their_padding_is_ignored(kind: str) -> None:
    torch.manual_seed(0)
    conn = build_connector(_config(kind, patch_dim=PATCH)).eval()
    tokens, valid = torch.randn(1, 4, DIM), torch.ones(1, 4, dtype=torch.bool)
    patches = torch.randn(1, 3, PATCH)
    alone = conn(tokens, valid, patches, torch.ones(1, 3, dtype=torch.bool))
    garbage = torch.full((1, 2, PATCH), float("nan"))
    padded = conn(tokens, valid, torch.cat([patches, garbage], 1), torch.tensor([[True] * 3 + [False] * 2]))
    n = alone.embeds.shape[1]
    torch.testing.assert_close(padded.embeds[:, :n][padded.valid[:, :n]], alone.embeds[alone.valid], rtol=1e-5, atol=1e-5)
    if kind == "mlp":
        assert alone.embeds.shape == (1, 4 + 3, WIDTH)
    # The patches matter: other patch features give other embeddings.
    other = conn(tokens, valid, torch.randn(1, 3, PATCH), torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(other.embeds, alone.embeds, atol=1e-4)


def test_pooled_tokens_are_the_mean_outputs_of_each_group_and_ignore_padding() -> None:
    torch.manual_seed(0)
    conn = build_connector(_config("mlp", patch_dim=PATCH, pooled_tokens=True)).eval()
    tokens, patches = torch.randn(1, 4, DIM), torch.randn(1, 3, PATCH)
    garbage = torch.full((1, 2, PATCH), float("nan"))
    out = conn(tokens, torch.ones(1, 4, dtype=torch.bool), torch.cat([patches, garbage], 1),
               torch.tensor([[True] * 3 + [False] * 2]))
    assert out.embeds.shape == (1, 4 + 5 + 2, WIDTH) and out.valid.sum().item() == 4 + 3 + 2
    rows = out.embeds[0][out.valid[0]]
    # Same weights, no pooling: the per-token rows, whose group means must be the two extra rows.
    plain = MLPConnector(_config("mlp", patch_dim=PATCH)).eval()
    plain.load_state_dict(conn.state_dict())
    each = plain(tokens, torch.ones(1, 4, dtype=torch.bool), patches, torch.ones(1, 3, dtype=torch.bool)).embeds[0]
    torch.testing.assert_close(rows[:7], each)
    torch.testing.assert_close(rows[7], each[:4].mean(0))
    torch.testing.assert_close(rows[8], each[4:].mean(0))
    # Without patches there is one pooled token; a Q-Former cannot pool.
    alone = build_connector(_config("mlp", pooled_tokens=True)).eval()(tokens, torch.ones(1, 4, dtype=torch.bool))
    assert alone.embeds.shape == (1, 5, WIDTH)
    with pytest.raises(ValueError, match="pooled_tokens"):
        _config("qformer", pooled_tokens=True)


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_without_summaries_only_the_patches_reach_the_llm(kind: str) -> None:
    torch.manual_seed(0)
    pooled = {"pooled_tokens": True} if kind == "mlp" else {}
    conn = build_connector(_config(kind, patch_dim=PATCH, use_summaries=False, **pooled)).eval()
    valid = torch.ones(1, 4, dtype=torch.bool)
    patches, patch_valid = torch.randn(1, 3, PATCH), torch.ones(1, 3, dtype=torch.bool)
    out = conn(torch.randn(1, 4, DIM), valid, patches, patch_valid)
    # Other encoder tokens change nothing: the connector does not read them.
    torch.testing.assert_close(conn(torch.randn(1, 4, DIM), valid, patches, patch_valid).embeds, out.embeds)
    if kind == "mlp":
        # The 3 patches and their mean; no summary rows, no pooled summary row.
        assert out.embeds.shape == (1, 3 + 1, WIDTH) == (1, conn.output_length(4, 3), WIDTH)
        torch.testing.assert_close(out.embeds[0, 3], out.embeds[0, :3].mean(0))
    with pytest.raises(ValueError, match="at least one valid patch"):
        conn(torch.randn(1, 4, DIM), valid, patches, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="use_patches"):
        _config(kind, use_summaries=False, use_patches=False)
    with pytest.raises(ValueError, match="patch width"):
        build_connector(_config(kind, use_summaries=False))


def test_patch_inputs_must_match_the_config() -> None:
    tokens, valid = torch.randn(1, 4, DIM), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass patches"):
        build_connector(_config(patch_dim=PATCH))(tokens, valid)
    with pytest.raises(ValueError, match="reads no patch features"):
        build_connector(_config())(tokens, valid, torch.randn(1, 2, PATCH), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="patches of shape"):
        build_connector(_config(patch_dim=PATCH))(tokens, valid, torch.randn(1, 2, PATCH + 1), torch.ones(1, 2, dtype=torch.bool))


def test_standardizer_centres_and_scales_and_starts_as_identity() -> None:
    torch.manual_seed(0)
    std = TokenStandardizer(DIM)
    x = torch.randn(50, DIM) * 3 + 17
    torch.testing.assert_close(std(x), x)
    std.fit(x)
    y = std(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(DIM), atol=1e-5, rtol=0)
    assert abs(float(y.pow(2).mean()) - 1.0) < 1e-4
    # A constant dimension is centred, not blown up (one scale for all dimensions).
    x[:, 0] = 5.0
    std.fit(x)
    assert float(std(x)[:, 0].abs().max()) < 1e-5
    with pytest.raises(ValueError, match="identical"):
        std.fit(torch.ones(4, DIM))
    with pytest.raises(ValueError, match="to fit"):
        std.fit(torch.ones(1, DIM))


def test_per_dimension_patch_scaling_and_its_conversion_keep_the_outputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, PATCH) * torch.logspace(-2, 1.5, PATCH) + 3.0
    x[:, 0] = 2.0
    std = TokenStandardizer(PATCH, per_dim=True)
    std.fit(x)
    y = std(x)
    torch.testing.assert_close(y[:, 1:].pow(2).mean(0), torch.ones(PATCH - 1), atol=1e-4, rtol=0)
    assert float(std.scale[0]) == 1.0 and float(y[:, 0].abs().max()) < 1e-5  # a constant dimension keeps scale 1
    # A shared-scale connector converted to per-dimension scales computes the same outputs.
    conn = build_connector(_config("mlp", patch_dim=PATCH, patch_scaling="shared", pooled_tokens=True)).eval()
    conn.standardize.fit(torch.randn(40, DIM) * 2 + 1)
    conn.patch_standardize.fit(x)
    tokens, valid = torch.randn(2, 3, DIM), torch.ones(2, 3, dtype=torch.bool)
    patches, patch_valid = x[:8].reshape(2, 4, PATCH), torch.ones(2, 4, dtype=torch.bool)
    before = conn(tokens, valid, patches, patch_valid).embeds
    conn.scale_patches_per_dim(x)
    torch.testing.assert_close(conn(tokens, valid, patches, patch_valid).embeds, before, atol=1e-5, rtol=1e-4)
    assert conn.config.patch_scaling == "per_dim" and conn.patch_standardize.per_dim
    reloaded = build_connector(conn.config).eval()
    reloaded.load_state_dict(conn.state_dict())
    torch.testing.assert_close(reloaded(tokens, valid, patches, patch_valid).embeds, before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="already"):
        conn.scale_patches_per_dim(x)
    # New configs scale per dimension; configs saved before the option existed used one shared scale.
    assert _config(patch_dim=PATCH).patch_scaling == "per_dim"
    old = {k: v for k, v in _config(patch_dim=PATCH).to_dict().items() if k != "patch_scaling"}
    assert ConnectorConfig.from_dict(old).patch_scaling == "shared"
    with pytest.raises(ValueError, match="patch_scaling"):
        _config(patch_scaling="per_token")
