"""The topo-pack encoder: implementation equality, padding, positions, I/O, MAE hiding."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from slidevl.slidellm.encoder import TopoPackConfig, TopoPackEncoder, collate_batches, load_encoder, save_encoder
from slidevl.slidellm.encoder.synthetic import synthetic_slide


def _config(**kw) -> TopoPackConfig:
    base = dict(patch_dim=32, pack_dim=24, global_dim=16, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, dropout=0.0)
    base.update(kw)
    return TopoPackConfig(**base)


def _encoder(seed: int = 0, **kw) -> TopoPackEncoder:
    torch.manual_seed(seed)
    return TopoPackEncoder(_config(**kw)).eval()


def _batch():
    big = synthetic_slide(11, 8, seed=1, tissue_fraction=0.7, summary_fraction=0.6).batch
    small = synthetic_slide(5, 4, seed=2).batch
    return collate_batches([big, small])


@pytest.mark.parametrize("variant", ["topo", "patch_sees_summary", "dense"])
def test_encoder_gather_equals_dense_outputs_and_parameter_grads(variant: str) -> None:
    enc = _encoder(mask_variant=variant).double()
    batch = _batch().to("cpu", torch.float64)
    results = {}
    for impl in ("dense", "gather"):
        out = enc(batch, impl=impl)
        loss = (out.tokens * torch.linspace(-1, 1, out.tokens.shape[-1], dtype=torch.float64)).sum()
        results[impl] = (out.tokens.detach(), torch.autograd.grad(loss, list(enc.parameters())))
    torch.testing.assert_close(results["gather"][0], results["dense"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results["gather"][1], results["dense"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_output_views_and_padding_rows() -> None:
    enc = _encoder()
    batch = _batch()
    out = enc(batch)
    b, p = batch.batch_size, batch.num_packs
    assert out.tokens.shape == (b, batch.num_tokens, 32)
    assert out.patch_tokens.shape == (b, p, 9, 32) and out.summary_tokens.shape == (b, p, 32)
    assert out.global_token.shape == (b, 32)
    assert (out.patch_tokens[~batch.patch_valid] == 0).all()
    assert (out.summary_tokens[~batch.pack_valid] == 0).all()
    assert out.summary_tokens[batch.pack_valid].abs().sum(-1).gt(0).all()


def test_a_slide_alone_equals_the_same_slide_in_a_padded_batch() -> None:
    enc = _encoder()
    batch = _batch()
    together = enc(batch)
    small = batch.split()[1]
    alone = enc(small)
    p = small.num_packs
    torch.testing.assert_close(alone.summary_tokens[0], together.summary_tokens[1, :p], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.patch_tokens[0], together.patch_tokens[1, :p], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.global_token[0], together.global_token[1], rtol=1e-5, atol=1e-5)


def _moved(batch, perm):
    """Same features, packs placed at permuted grid positions."""
    return replace(batch, pack_grid=batch.pack_grid[:, perm])


def test_positional_encoding_switch() -> None:
    batch = synthetic_slide(9, 9, seed=3).batch
    perm = torch.randperm(batch.num_packs, generator=torch.Generator().manual_seed(0))
    with_pos = _encoder(pos_encoding=True)
    assert not torch.allclose(with_pos(batch).summary_tokens, with_pos(_moved(batch, perm)).summary_tokens, atol=1e-4)
    without = _encoder(pos_encoding=False)
    torch.testing.assert_close(without(batch).summary_tokens, without(_moved(batch, perm)).summary_tokens, rtol=1e-5, atol=1e-5)
    # a whole-slide translation of the pack grid changes nothing (positions are relative)
    shifted = replace(batch, pack_grid=batch.pack_grid + torch.tensor([5, 2]))
    torch.testing.assert_close(with_pos(batch).tokens, with_pos(shifted).tokens, rtol=1e-5, atol=1e-5)


def test_missing_summaries_use_the_learned_embedding() -> None:
    batch = synthetic_slide(9, 9, seed=4, summary_fraction=0.5).batch
    assert (~batch.pack_present).any()
    enc = _encoder()
    junk = batch.pack_features.clone()
    junk[~batch.pack_present] = 1e3  # features of packs flagged absent must be ignored
    torch.testing.assert_close(enc(batch).tokens, enc(replace(batch, pack_features=junk)).tokens)
    # a store without pack features at all (width 0) works the same way
    no_packs = replace(batch, pack_features=batch.pack_features[..., :0], pack_present=torch.zeros_like(batch.pack_present))
    assert torch.isfinite(enc(no_packs).tokens).all()


def test_hidden_tokens_do_not_influence_visible_ones() -> None:
    enc = _encoder()
    batch = synthetic_slide(9, 9, seed=5).batch
    g = torch.Generator().manual_seed(0)
    patch_keep = torch.rand(batch.patch_valid.shape, generator=g) < 0.4
    summary_keep = torch.rand(batch.pack_valid.shape, generator=g) < 0.5
    out = enc(batch, patch_keep=patch_keep, summary_keep=summary_keep)
    noisy = batch.patch_features + 50 * (~patch_keep)[..., None] * torch.randn(batch.patch_features.shape, generator=g)
    noisy_pack = batch.pack_features + 50 * (~summary_keep)[..., None] * torch.randn(batch.pack_features.shape, generator=g)
    out2 = enc(replace(batch, patch_features=noisy, pack_features=noisy_pack), patch_keep=patch_keep, summary_keep=summary_keep)
    torch.testing.assert_close(out2.tokens, out.tokens, rtol=1e-5, atol=1e-5)
    assert (out.patch_tokens[~patch_keep] == 0).all() and (out.summary_tokens[~summary_keep] == 0).all()


def test_layer_checkpointing_keeps_gradients() -> None:
    batch = synthetic_slide(6, 6, seed=6).batch
    grads = []
    for ckpt in (False, True):
        enc = _encoder(checkpoint_layers=ckpt)
        enc(batch).tokens.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_and_load_roundtrip(tmp_path) -> None:
    enc = _encoder(seed=3, mask_variant="patch_sees_summary", pos_encoding=False)
    batch = synthetic_slide(6, 6, seed=7).batch
    save_encoder(enc, tmp_path)
    cfg = json.loads((tmp_path / "encoder_config.json").read_text())
    assert cfg["mask_variant"] == "patch_sees_summary" and cfg["d_model"] == 32 and cfg["n_layers"] == 2
    loaded = load_encoder(tmp_path).eval()
    torch.testing.assert_close(loaded(batch).tokens, enc(batch).tokens, rtol=0, atol=0)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="mask_variant"):
        _config(mask_variant="sparse")
    with pytest.raises(ValueError, match="divisible"):
        _config(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        TopoPackConfig.from_dict({**_config().to_dict(), "extra": 1})


def test_encoder_rejects_mismatched_features() -> None:
    enc = _encoder()
    batch = synthetic_slide(6, 6, seed=8, patch_dim=20).batch
    with pytest.raises(ValueError, match="patch features are 20-d"):
        enc(batch)


def test_paper_defaults() -> None:
    cfg = TopoPackConfig(patch_dim=1024, pack_dim=1024, global_dim=1024)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout, cfg.pack_size) == (6, 512, 8, 2048, 0.1, 3)
    enc = TopoPackEncoder(cfg)
    first = enc.transformer.layers[0]
    assert first.norm1.normalized_shape == (512,) and first.ffn[0].out_features == 2048
