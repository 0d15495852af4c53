"""Baselines (mean pooling, ABMIL, TransMIL), bags from the feature store, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidevl.features.store import FeatureStore, FeatureStoreError
from slidevl.survival.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slidevl.survival.data import BagCache, PatientBag
from slidevl.survival.hila.prompts import EncodedPrompts
from slidevl.survival.models.transmil import NystromAttention, _pinv_iterative
from slidevl.survival.registry import build_model
from slidevl.survival.toy import make_toy_cohort


def _bag(n: int = 40, dim: int = 12) -> PatientBag:
    g = torch.Generator().manual_seed(0)
    return PatientBag("P", 0, torch.randn(n, dim, generator=g), torch.randint(0, 5, (n,), generator=g), torch.randn(5, 6, generator=g), [])


def test_abmil_attention_is_a_distribution_over_patches() -> None:
    model = build_model("abmil", in_dim=12, region_dim=6, n_bins=4).eval()
    out = model(_bag(), evidence=True)
    attention = out.evidence["patch"]["attention"]
    assert out.logits.shape == (4,) and attention.shape == (40,)
    assert attention.min() >= 0 and attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_meanpool_is_permutation_invariant() -> None:
    model = build_model("meanpool", in_dim=12, region_dim=6, n_bins=4).eval()
    bag = _bag()
    shuffled = PatientBag("P", 0, bag.patch[torch.randperm(40)], bag.region_index, bag.region, [])
    torch.testing.assert_close(model(bag).logits, model(shuffled).logits)


def test_pinv_iteration_approximates_the_inverse() -> None:
    x = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    z = _pinv_iterative(x.double(), iters=20)
    torch.testing.assert_close(x.double() @ z @ x.double(), x.double(), atol=1e-6, rtol=1e-5)


def test_nystrom_approximates_full_attention_on_long_sequences() -> None:
    torch.manual_seed(0)
    attn = NystromAttention(32, heads=4, num_landmarks=32, full_attention_max=64).eval()
    # Smooth sequences (neighbours alike) have low-rank attention: Nyström is close to exact.
    x = torch.cumsum(torch.randn(1, 600, 32) * 0.05, dim=1)
    approx = attn(x)
    attn.full_attention_max = 10_000
    exact = attn(x)
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 0.1
    attn.full_attention_max = 64
    assert attn(x[:, :576]).shape == (1, 576, 32)  # an exact multiple of the landmarks: no padding


@pytest.mark.parametrize("n", [1, 2, 7, 1100])
def test_transmil_handles_any_bag_size(n: int) -> None:
    model = build_model("transmil", in_dim=12, region_dim=6, n_bins=4, options={"dim": 64}).eval()
    assert model(_bag(n)).logits.shape == (4,)


def test_bags_concatenate_slides_and_cache_reads(tmp_path: Path) -> None:
    cohort = make_toy_cohort(tmp_path, n_patients=6, second_slide=1.0, seed=1)
    store = FeatureStore(cohort.job)
    cache = BagCache(store, "store")
    a, b = store.load("TOY-0000-S0"), store.load("TOY-0000-S1")
    bag = cache.bag("TOY-0000", ["TOY-0000-S0", "TOY-0000-S1"])
    assert bag.patch.shape[0] == a.n_patches + b.n_patches and bag.patch.dtype == torch.float32
    ra = len(a.region_features)
    assert int(bag.region_index[: a.n_patches].max()) < ra <= int(bag.region_index[a.n_patches:].min())
    torch.testing.assert_close(bag.region[ra:], torch.from_numpy(b.region_features))
    assert [s.slide_id for s in bag.spans] == ["TOY-0000-S0", "TOY-0000-S1"] and bag.spans[1].start == a.n_patches
    cache.bag("TOY-0000", ["TOY-0000-S0", "TOY-0000-S1"])
    assert cache.reads == 2, "each slide is read from HDF5 once"

    pooled = BagCache(store, "pooled").bag("TOY-0000", ["TOY-0000-S0"])
    idx = pooled.region_index
    torch.testing.assert_close(pooled.region[0], pooled.patch[idx == 0].mean(0))

    tight = BagCache(store, "store", max_cache_bytes=0)
    tight.bag("TOY-0001", store.slide_ids()[2:3])
    tight.bag("TOY-0001", store.slide_ids()[2:3])
    assert tight.reads == 2 and tight.stats()["cached_slides"] == 0


def test_store_mode_requires_region_features(tmp_path: Path) -> None:
    cohort = make_toy_cohort(tmp_path, n_patients=2, seed=2)
    store = FeatureStore(cohort.job)
    sf = store.load("TOY-0000-S0")
    sf.region_features = None
    store.write(sf)
    with pytest.raises(FeatureStoreError, match="no region/features table.*--region-tokens pooled"):
        BagCache(store, "store").bag("TOY-0000", ["TOY-0000-S0"])
    assert BagCache(store, "auto").bag("TOY-0000", ["TOY-0000-S0"]).region.shape[1] == 32


@pytest.mark.parametrize("name", ["meanpool", "abmil", "transmil", "hila"])
def test_checkpoint_round_trip(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    prompts = {s: EncodedPrompts(rng.normal(size=(4, 3, 10)).astype(np.float32), np.ones((4, 3), bool), ()) for s in ("patch", "region")}
    options = {"dim": 32} if name in ("transmil", "hila") else {}
    model = build_model(name, in_dim=12, region_dim=6, n_bins=4, options=options, prompts=prompts).eval()
    save_checkpoint(tmp_path / "fold_0", model, {"bins": {"edges": [0, 1, 2, 3, 4], "mode": "all"}})
    loaded, config = load_checkpoint(tmp_path / "fold_0")
    assert config["model"]["name"] == name and config["bins"]["mode"] == "all"
    bag = _bag()
    torch.testing.assert_close(loaded(bag).logits, model(bag).logits)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
