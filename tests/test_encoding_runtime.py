"""Encoding runtime: forward-pass precision of network encoders, reader-worker defaults."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from slidevl.features.config import PreprocessConfig, available_cpus, default_workers
from slidevl.features.encoders.base import EncoderError, NetworkTileEncoder
from slidevl.features.encoders.region import get_region_encoder
from slidevl.features.encoders.registry import get_encoder
from slidevl.features.encoders.transforms import ResizeNormalize
from slidevl.features.pipeline import Encoders
from slidevl.features.tiles import prefetch_factor


class TinyViT(NetworkTileEncoder):
    """A small timm ViT (random weights) behind the network-encoder contract."""

    def __init__(self, device: str = "cpu") -> None:
        import timm

        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = timm.create_model(
            "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
            num_classes=0,
        ).eval().to(self.device)
        self.transform = ResizeNormalize(resize=32, crop=32)
        self.name, self.revision, self.input_size, self.feature_dim = "tiny-vit", "test", 32, 64

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 48, 48, 3), dtype=np.uint8)


def test_cpu_auto_and_fp32_equal_the_plain_float32_forward(tiles: np.ndarray) -> None:
    enc = TinyViT()
    x = enc.worker_transform(tiles)
    with torch.inference_mode():
        reference = enc.model(x.to(torch.float32)).numpy()  # the forward as it ran before precision existed
    assert enc.compute_precision == "fp32"
    for precision in ("auto", "fp32"):
        enc.set_precision(precision)
        out = enc.encode(x)
        assert out.dtype == np.float32 and out.shape == (5, 64)
        np.testing.assert_array_equal(out, reference)


def test_bf16_on_request_returns_float32_close_to_fp32(tiles: np.ndarray) -> None:
    enc = TinyViT()
    x = enc.worker_transform(tiles)
    fp32 = enc.encode(x)
    enc.set_precision("bf16")
    assert enc.compute_precision == "bf16"
    bf16 = enc.encode(x)
    assert bf16.dtype == np.float32 and bf16.shape == (5, 64)
    assert not np.array_equal(bf16, fp32)  # autocast really ran in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * np.abs(fp32).max())
    assert enc.encode(x[:0]).shape == (0, 64)


def test_unknown_precision_is_rejected() -> None:
    enc = TinyViT()
    with pytest.raises(EncoderError, match="precision"):
        enc.set_precision("fp16")
    assert enc.precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        PreprocessConfig(precision="half")


def test_precision_enters_the_fingerprint_of_network_encoders_only() -> None:
    region = get_region_encoder("mean")
    enc = TinyViT()
    assert Encoders(tile=enc, region=region).describe()["precision"] == "fp32"
    enc.set_precision("bf16")
    assert Encoders(tile=enc, region=region).describe()["precision"] == "bf16"
    # Hand-crafted features have no precision; their fingerprints stay as they were.
    assert "precision" not in Encoders(tile=get_encoder("handcrafted"), region=region).describe()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_is_bf16_from_pinned_memory(tiles: np.ndarray) -> None:
    cpu, cuda = TinyViT(), TinyViT("cuda")
    x = cpu.worker_transform(tiles)
    assert cuda.compute_precision == "bf16"
    out = cuda.encode(x.pin_memory())
    assert out.dtype == np.float32 and out.shape == (5, 64)
    np.testing.assert_allclose(out, cpu.encode(x), atol=0.1 * np.abs(out).max())


@pytest.mark.parametrize(
    ("slurm", "expected_cpus", "expected_workers"),
    [("4", 4, 3), ("1", 1, 1), ("2", 2, 2), ("64", 64, 8)],
)
def test_workers_follow_slurm_cpus_per_task(monkeypatch: pytest.MonkeyPatch, slurm: str, expected_cpus: int,
                                            expected_workers: int) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
    assert available_cpus() == expected_cpus
    assert default_workers() == expected_workers
    assert PreprocessConfig().workers == expected_workers


def test_workers_follow_the_affinity_mask_without_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert default_workers() == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_workers() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")  # set but empty (as some launchers do): ignored
    assert default_workers() == 2


def test_prefetch_bounds_batches_in_flight() -> None:
    assert [prefetch_factor(w) for w in (0, 1, 2, 8, 16)] == [8, 8, 4, 2, 2]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "10"}, (3, 10)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (0, 4)),
        ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "5"}, (9, 10)),
    ],
)
def test_slurm_array_tasks_take_disjoint_shards(env: dict, expected: tuple | None) -> None:
    from slidevl.features.config import slurm_array_shard

    assert slurm_array_shard(env) == expected


def test_slurm_array_outside_its_range_names_the_fix() -> None:
    from slidevl.features.config import slurm_array_shard

    with pytest.raises(ValueError, match="--shard i/n"):
        slurm_array_shard({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "10"})
