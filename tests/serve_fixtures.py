"""A tiny but complete job folder for the viewer tests, made by the real pipeline.

Two pyramidal Aperio-style TIFF slides (tissue is one known rectangle on glass, so areas
are known) and one corrupt slide go through :func:`slidevl.features.pipeline.preprocess`,
which writes the features, tissue contours, status files and the manifest (the corrupt
slide is listed as failed). Added on top: a VQA ROI file in the viewer's format and a
survival run folder in the format of ``slidevl survival cv`` (OOF risks, summary with the
run's stratification, HiLa-style evidence, one real fold checkpoint).

:func:`shared_job` builds it once per test session.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from rich.console import Console

from slidevl.atomic import write_json_atomic
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.features.store import FeatureStore, SlideFeatures
from slidevl.survival.checkpoint import save_checkpoint
from slidevl.survival.evidence import prompt_table
from slidevl.survival.metrics import c_index, stratify
from slidevl.survival.registry import build_model

MPP = 0.5
TILE = 256
ENCODER = "handcrafted"  # the pipeline's default encoder
PROMPTS = ["dense tumour nests", "lymphocyte-rich stroma", "necrosis"]


@dataclass(frozen=True)
class ToySlide:
    slide_id: str
    width: int
    height: int
    # Tissue is one axis-aligned rectangle (level-0 px), so its area is exact.
    tissue_box: tuple[int, int, int, int]


SLIDES = (
    ToySlide("TOY-01", 3072, 2048, (512, 256, 2560, 1792)),
    ToySlide("TOY-02", 2048, 2048, (256, 512, 1792, 1792)),
)


def _render(slide: ToySlide, seed: int) -> np.ndarray:
    """H&E-ish RGB image: white glass, pink tissue with purple nuclei-like speckles."""
    rng = np.random.default_rng(seed)
    img = np.full((slide.height, slide.width, 3), 242, np.uint8)
    x0, y0, x1, y1 = slide.tissue_box
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:h, 0:w]
    # Smooth stain variation across the tissue plus coarse speckles make zoom levels distinguishable.
    base = np.stack([230 - 30 * xx / w, 150 + 40 * yy / h, 200 - 20 * xx / w], axis=-1)
    nuclei = rng.random((h // 16 + 1, w // 16 + 1)) > 0.8
    nuclei = np.kron(nuclei, np.ones((16, 16), bool))[:h, :w]
    base[nuclei] = (110, 60, 150)
    img[y0:y1, x0:x1] = base.astype(np.uint8)
    return img


def write_aperio_tiff(path: Path, image: np.ndarray, mpp: float = MPP) -> Path:
    """Write a 2-level pyramidal TIFF that OpenSlide opens as an Aperio slide."""
    h, w = image.shape[:2]
    desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(image, tile=(TILE, TILE), compression="jpeg", photometric="rgb", description=desc, metadata=None)
        low = image[::4, ::4]
        tif.write(np.ascontiguousarray(low), tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                  subfiletype=1, metadata=None)
    return path


def _evidence(slide: ToySlide, sf: SlideFeatures, seed: int, patient_id: str, risk: float) -> dict:
    """An evidence record as :func:`slidevl.survival.evidence.write_evidence` writes it for HiLa."""
    rng = np.random.default_rng(seed)
    n = sf.n_patches
    alignment = rng.random(n)
    kept = alignment >= np.quantile(alignment, 0.4)
    n_regions = len(sf.region_coords)
    # Level 0 is the shortest-survival bin, as in the real prompt banks.
    scale_texts = ((PROMPTS[2],), tuple(PROMPTS[:2]))
    prompts = {scale: prompt_table(scale_texts, ("high risk", "low risk")) for scale in ("patch", "region")}
    return {
        "slide_id": slide.slide_id, "patient_id": patient_id, "model": "hila", "fold": seed, "risk": risk,
        "prompts": prompts,
        "patch": {"index": list(range(n)), "coords": sf.patch_coords.tolist(), "kept": kept.tolist(),
                  "prompt_index": [(0, 2, 3)[i % 3] for i in range(n)], "alignment": alignment.round(4).tolist()},
        "patch_level_scores": [0.4, 0.6],
        "region": {"coords": sf.region_coords.tolist(), "kept": [True] * n_regions,
                   "prompt_index": [0] * n_regions, "alignment": [0.5] * n_regions},
        "region_level_scores": [0.3, 0.7],
    }


BIN_EDGES = [0.0, 12.0, 30.0, 60.0, 120.0]


def _survival_run(root: Path, features: dict[str, SlideFeatures]) -> Path:
    """A run folder as `slidevl survival cv` writes it, for a 40-patient cohort holding the toy slides.

    Patient ``P00`` (TOY-01) was validated in fold 0, whose checkpoint is a real (untrained)
    ABMIL model; ``P01`` (TOY-02) in fold 1, whose checkpoint is absent. TOY-01 carries HiLa
    evidence (OPL tokens), TOY-02 attention-model evidence.
    """
    rng = np.random.default_rng(7)
    run = root / "run"
    rows, clinical = [], []
    for i in range(40):
        pid = f"P{i:02d}"
        risk = float(rng.normal())
        t = float(np.clip(rng.exponential(30 * np.exp(-0.5 * risk)), 1, 120))
        e = int(rng.random() < 0.6)
        rows.append({"patient_id": pid, "fold": i % 5, "risk": round(risk, 4), "t": round(t, 2), "e": e})
        clinical.append({"pathology_id": SLIDES[i].slide_id if i < len(SLIDES) else f"COH-{i:02d}", "patient_id": pid, "e": e, "t": round(t, 2)})
    run.mkdir(parents=True, exist_ok=True)
    for name, table in (("oof_risks.csv", rows), ("clinical.csv", clinical)):
        with open((run if name.startswith("oof") else root) / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    t, e, risk, fold = (np.array([r[k] for r in rows]) for k in ("t", "e", "risk", "fold"))
    folds = [c_index(t[fold == k], e[fold == k], risk[fold == k]) for k in range(5)]
    strat = stratify(t, e, risk)
    write_json_atomic(run / "summary.json", {
        "model": "hila", "variant": "full",
        "c_index": {"folds": folds, "mean": float(np.mean(folds)), "std": float(np.std(folds)), "std_ddof": 0},
        "logrank_p": strat.p_value, "stratification": strat.as_dict(),
        "bins": {"mode": "all", "n_bins": 4, "edges": [BIN_EDGES] * 5},
        "cohort": {"clinical": str(root / "clinical.csv"), "patients": 40, "slides": 40, "events": sum(r["e"] for r in rows)},
    })
    torch.manual_seed(0)
    dim = next(iter(features.values())).patch_features.shape[1]
    model = build_model("abmil", in_dim=dim, region_dim=dim, n_bins=len(BIN_EDGES) - 1)
    save_checkpoint(run / "fold_0", model, {"fold": 0, "bins": {"edges": BIN_EDGES, "mode": "all"}, "region_tokens": "auto",
                                            "feature_encoder": FeatureStore(root / "job").encoder, "scaler": None})
    toy1, toy2 = SLIDES
    write_json_atomic(run / "evidence" / f"{toy1.slide_id}.json",
                      _evidence(toy1, features[toy1.slide_id], 0, rows[0]["patient_id"], rows[0]["risk"]))
    # An attention model's evidence: one weight per patch, summing to 1 over the bag.
    attention = np.random.default_rng(1).dirichlet(np.ones(features[toy2.slide_id].n_patches))
    write_json_atomic(run / "evidence" / f"{toy2.slide_id}.json", {
        "slide_id": toy2.slide_id, "patient_id": rows[1]["patient_id"], "model": "abmil", "fold": 1, "risk": rows[1]["risk"],
        "patch": {"index": list(range(len(attention))), "coords": features[toy2.slide_id].patch_coords.tolist(),
                  "attention": attention.round(6).tolist()},
    })
    return run


def make_job(root: Path, *, with_survival: bool = True) -> dict[str, Path]:
    """Create ``root/job`` (and ``root/run`` if asked); return the paths the tests need."""
    job = root / "job"
    slides_dir = root / "slides"
    for k, slide in enumerate(SLIDES):
        write_aperio_tiff(slides_dir / f"{slide.slide_id}.tiff", _render(slide, k))
    # Not a slide at all: preprocessing records it as failed, the viewer lists it with its error.
    (slides_dir / "BROKEN-03.svs").write_bytes(b"this is not a slide\n" * 64)
    report = preprocess(slides_dir.resolve(), job, PreprocessConfig(workers=0, progress=False), console=Console(quiet=True))
    status = {r.slide_id: r.status for r in report.results}
    if status != {"TOY-01": "ok", "TOY-02": "ok", "BROKEN-03": "failed"}:
        raise RuntimeError(f"preprocessing the viewer fixture went wrong: {[(r.slide_id, r.status, r.error) for r in report.results]}")
    write_json_atomic(job / "rois" / f"{SLIDES[0].slide_id}.json", {
        "slide": SLIDES[0].slide_id,
        "rois": [{"id": "roi-1", "bbox": [600, 300, 1400, 900], "label": "tumour nest"},
                 {"id": "roi-2", "bbox": [1600, 1000, 2400, 1700], "label": "stroma",
                  "polygon": [[1600, 1000], [2400, 1000], [2400, 1700], [1600, 1000]]}],
    })
    paths = {"job": job, "slides": slides_dir}
    if with_survival:
        store = FeatureStore(job)
        paths["run"] = _survival_run(root, {s.slide_id: store.load(s.slide_id) for s in SLIDES})
    return paths


def shared_job(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture job, built on first use and shared by every module of the session (read-only)."""
    root = factory.getbasetemp() / "serve_shared"
    done = root / "paths.json"
    if not done.is_file():
        if root.exists():
            shutil.rmtree(root)  # a half-built job from an interrupted earlier attempt
        paths = make_job(root)
        write_json_atomic(done, {k: str(v) for k, v in paths.items()})
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


def tissue_area_mm2(slide: ToySlide, bbox: tuple[int, int, int, int] | None = None) -> float:
    """True tissue area of a toy slide (inside ``bbox`` if given), in mm²; contours approximate it."""
    x0, y0, x1, y1 = slide.tissue_box
    if bbox is not None:
        x0, y0 = max(x0, bbox[0]), max(y0, bbox[1])
        x1, y1 = min(x1, bbox[2]), min(y1, bbox[3])
    return max(0, x1 - x0) * max(0, y1 - y0) * (MPP * 1e-3) ** 2


if __name__ == "__main__":  # pragma: no cover - handy for manual viewing: python tests/serve_fixtures.py DIR
    import sys

    print(json.dumps({k: str(v) for k, v in make_job(Path(sys.argv[1])).items()}))
