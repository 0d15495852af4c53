"""MAE: which tokens each phase hides, what the loss scores, and what the decoder can see."""

from __future__ import annotations

import torch

from slidevl.slidellm.encoder import TopoPackConfig, collate_batches
from slidevl.slidellm.encoder.synthetic import synthetic_slide
from slidevl.slidellm.pretrain import MAEMask, PretrainConfig, PretrainModel, mae_loss, mae_mask


def _batch():
    return collate_batches([synthetic_slide(30, 24, seed=1, tissue_fraction=0.8).batch, synthetic_slide(12, 9, seed=2).batch])


def test_phase1_hides_75_percent_of_patches_inside_every_pack() -> None:
    batch = _batch()
    mask = mae_mask(batch, 1, torch.Generator().manual_seed(0), 0.75)
    valid = batch.patch_valid & batch.pack_valid[..., None]
    assert mask.summary_keep.all()  # summaries stay visible in phase 1
    assert torch.equal(mask.target, valid & ~mask.patch_keep)
    n_valid = valid.sum(-1)
    n_hidden = mask.target.sum(-1)
    # per pack: floor or ceil of 75 % of its real patches
    lo, hi = torch.floor(0.75 * n_valid.double()).long(), torch.ceil(0.75 * n_valid.double()).long()
    assert ((n_hidden >= lo) & (n_hidden <= hi)).all()
    frac = n_hidden.sum().item() / n_valid.sum().item()
    assert abs(frac - 0.75) < 0.03


def test_phase2_hides_75_percent_of_whole_packs() -> None:
    batch = _batch()
    mask = mae_mask(batch, 2, torch.Generator().manual_seed(1), 0.75)
    hidden_pack = batch.pack_valid & ~mask.summary_keep
    # all-or-nothing per pack: a hidden pack loses its summary and all its patches
    assert torch.equal(mask.patch_keep, mask.summary_keep[..., None].expand_as(mask.patch_keep))
    valid = batch.patch_valid & batch.pack_valid[..., None]
    assert torch.equal(mask.target, valid & hidden_pack[..., None])
    for b in range(batch.batch_size):
        n = int(batch.pack_valid[b].sum())
        assert int(hidden_pack[b].sum()) == round(0.75 * n)
        assert int((batch.pack_valid[b] & mask.summary_keep[b]).sum()) >= 1


def test_phase2_keeps_one_pack_of_a_single_pack_slide() -> None:
    batch = synthetic_slide(3, 3, seed=3).batch
    mask = mae_mask(batch, 2, torch.Generator().manual_seed(0), 0.75)
    assert mask.summary_keep.all() and not mask.target.any()


def test_loss_scores_hidden_patches_only() -> None:
    batch = _batch()
    mask = mae_mask(batch, 1, torch.Generator().manual_seed(2))
    pred = torch.randn(*batch.patch_features.shape, generator=torch.Generator().manual_seed(3))
    base = mae_loss(pred, batch, mask)
    changed = pred + 10 * (~mask.target)[..., None]  # alter every prediction that is not scored
    torch.testing.assert_close(mae_loss(changed, batch, mask), base)
    assert not torch.allclose(mae_loss(pred + mask.target[..., None].float(), batch, mask), base)
    # perfect predictions of the normalised targets give zero loss
    target = torch.nn.functional.layer_norm(batch.patch_features, batch.patch_features.shape[-1:], eps=1e-6)
    assert mae_loss(target, batch, mask).item() < 1e-10


def _model() -> PretrainModel:
    torch.manual_seed(0)
    ecfg = TopoPackConfig(patch_dim=32, pack_dim=24, global_dim=16, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, dropout=0.0)
    return PretrainModel(ecfg, PretrainConfig(decoder_dim=32, decoder_layers=2, decoder_heads=4)).eval()


def test_hidden_pack_predictions_read_neighbouring_packs() -> None:
    """In phase 2 a hidden pack can only be rebuilt from other packs: gradients must reach them."""
    batch = synthetic_slide(9, 9, seed=4).batch  # 3x3 packs
    keep = torch.ones(1, batch.num_packs, dtype=torch.bool)
    centre = int(((batch.pack_grid[0] == torch.tensor([1, 1])).all(1)).nonzero())
    keep[0, centre] = False
    mask = MAEMask(keep[..., None].expand_as(batch.patch_valid).clone(), keep, batch.patch_valid & ~keep[..., None])
    feats = batch.patch_features.clone().requires_grad_(True)
    from dataclasses import replace

    pred = _model()("mae", replace(batch, patch_features=feats), mask)
    pred[0, centre].sum().backward()
    per_pack = feats.grad.abs().sum(dim=(2, 3))[0]
    assert per_pack[centre] == 0  # the hidden pack's own features are invisible
    assert (per_pack[torch.arange(batch.num_packs) != centre] > 0).all()
