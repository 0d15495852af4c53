"""A feature-level toy cohort with planted survival signal, for tests and quick checks.

No images are involved: each patient gets a latent risk ``z ~ N(0, 1)``; their patches
are drawn from tissue-class prototypes whose mixture shifts with ``z`` (more grade-3
tumour and necrosis, fewer lymphocytes and grade-1 tumour as risk rises); survival
times are exponential with hazard ∝ exp(``effect`` · z) and uniformly censored. The
feature files follow the slidevl store layout, with region features (a fixed random
projection of the mean patch feature of each 4x4-patch region), so every model and the
whole CV pipeline can run on them in seconds. Image-level synthetic slides are made by
``slidevl synth``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slidevl.atomic import atomic_path
from slidevl.features.store import FeatureStore, SlideFeatures

TOY_CLASSES = ("tumour grade 1", "tumour grade 2", "tumour grade 3", "stroma", "lymphocytes", "necrosis", "fat")
# How each class's log-odds moves with the latent risk z.
_RISK_SLOPE = np.array([-1.0, 0.0, 1.2, 0.0, -1.0, 1.2, 0.0])
_REGION_PATCHES = 4
_GRID_COLS = 12
_PATCH_PX = 256


@dataclass
class ToyCohort:
    job: Path
    clinical: Path
    truth: pd.DataFrame  # patient_id, risk (latent z), e, t


def _slide(rng: np.random.Generator, slide_id: str, z: float, protos: np.ndarray, proj: np.ndarray,
           n: int, noise: float) -> SlideFeatures:
    logits = _RISK_SLOPE * z
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    classes = rng.choice(len(TOY_CLASSES), size=n, p=probs)
    feats = (protos[classes] + noise * rng.standard_normal((n, protos.shape[1]))).astype(np.float32)
    grid = np.stack([np.arange(n) % _GRID_COLS, np.arange(n) // _GRID_COLS], axis=1).astype(np.int64)
    cell = grid // _REGION_PATCHES
    region_cells, region_index = np.unique(cell[:, 1] * 1000 + cell[:, 0], return_inverse=True)
    region_grid = np.stack([region_cells % 1000, region_cells // 1000], axis=1).astype(np.int64)
    region_mean = np.stack([feats[region_index == r].mean(axis=0) for r in range(len(region_cells))])
    region_feats = (np.tanh(region_mean @ proj) + 0.05 * rng.standard_normal((len(region_cells), proj.shape[1]))).astype(np.float32)
    pack_cells, pack_index = np.unique((grid[:, 1] // 3) * 1000 + grid[:, 0] // 3, return_inverse=True)
    pack_grid = np.stack([pack_cells % 1000, pack_cells // 1000], axis=1).astype(np.int64)
    return SlideFeatures(
        slide_id=slide_id,
        patch_features=feats,
        patch_coords=grid * _PATCH_PX,
        patch_grid=grid,
        patch_region=region_index.astype(np.int64),
        patch_pack=pack_index.astype(np.int64),
        patch_tissue=np.ones(n, np.float32),
        region_features=region_feats,
        region_coords=region_grid * _PATCH_PX * _REGION_PATCHES,
        region_grid=region_grid,
        pack_coords=pack_grid * _PATCH_PX * 3,
        pack_grid=pack_grid,
        attrs={"encoder": "toy", "toy_classes": list(TOY_CLASSES), "patch_size_level0": _PATCH_PX},
    )


def make_toy_cohort(
    out: str | Path,
    n_patients: int = 30,
    *,
    dim: int = 32,
    region_dim: int = 16,
    patches: tuple[int, int] = (48, 96),
    second_slide: float = 0.2,
    effect: float = 1.5,
    noise: float = 0.5,
    seed: int = 0,
    encoder: str = "toy",
) -> ToyCohort:
    """Write ``out/features/<encoder>/*.h5``, ``out/clinical.csv`` and ``out/truth.csv``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((len(TOY_CLASSES), dim))
    proj = rng.standard_normal((dim, region_dim)) / np.sqrt(dim)
    store = FeatureStore(out, encoder)
    z = rng.standard_normal(n_patients)
    event_time = rng.exponential(30.0 * np.exp(-effect * z))
    censor_time = rng.uniform(6.0, 150.0, n_patients)
    t = np.round(np.minimum(event_time, censor_time), 2)
    e = (event_time <= censor_time).astype(int)
    rows, truth = [], []
    for i in range(n_patients):
        pid = f"TOY-{i:04d}"
        for s in range(1 + int(rng.random() < second_slide)):
            slide_id = f"{pid}-S{s}"
            store.write(_slide(rng, slide_id, z[i], protos, proj, int(rng.integers(*patches)), noise))
            rows.append({"pathology_id": slide_id, "patient_id": pid, "e": e[i], "t": t[i]})
        truth.append({"patient_id": pid, "risk": z[i], "e": e[i], "t": t[i]})
    clinical = out / "clinical.csv"
    with atomic_path(clinical) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    truth_frame = pd.DataFrame(truth)
    with atomic_path(out / "truth.csv") as tmp:
        truth_frame.to_csv(tmp, index=False)
    return ToyCohort(out, clinical, truth_frame)
