"""Per-dimension feature standardisation, fitted on the training patients of a fold.

Handcrafted features mix scales (counts, intensities, texture statistics) that an MLP
on raw values learns slowly; deep features are indifferent to it. The shift and
scale are fitted on training patches (and regions) only, so nothing of the validation
fold leaks, and are saved with the fold's checkpoint so prediction applies the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch

from slidevl.survival.data import PatientBag

_MIN_STD = 1e-6


def _moments(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    # Constant dimensions keep unit scale instead of blowing up.
    return mean.astype(np.float32), np.where(std < _MIN_STD, 1.0, std).astype(np.float32)


@dataclass
class FeatureScaler:
    patch_mean: np.ndarray
    patch_std: np.ndarray
    region_mean: np.ndarray
    region_std: np.ndarray

    @classmethod
    def fit(cls, bags: Iterable[PatientBag]) -> "FeatureScaler":
        """Mean and standard deviation over every patch and region token of ``bags``."""
        sums: dict[str, list] = {}
        for bag in bags:
            for name, x in (("patch", bag.patch), ("region", bag.region)):
                x = x.double()
                acc = sums.setdefault(name, [0.0, 0.0, 0])
                acc[0] = acc[0] + x.sum(0).numpy()
                acc[1] = acc[1] + (x * x).sum(0).numpy()
                acc[2] += x.shape[0]
        if not sums:
            raise ValueError("cannot fit feature scaling on an empty set of patients")
        patch = _moments(*sums["patch"])
        region = _moments(*sums["region"])
        return cls(patch[0], patch[1], region[0], region[1])

    def apply(self, bag: PatientBag) -> PatientBag:
        """A standardised copy of ``bag`` (the cached tensors are left untouched)."""
        def scale(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
            return (x - torch.from_numpy(mean).to(x.device)) / torch.from_numpy(std).to(x.device)

        return replace(bag, patch=scale(bag.patch, self.patch_mean, self.patch_std),
                       region=scale(bag.region, self.region_mean, self.region_std))

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in ("patch_mean", "patch_std", "region_mean", "region_std")}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> "FeatureScaler":
        return cls(**{k: np.asarray(v, dtype=np.float32) for k, v in data.items()})
