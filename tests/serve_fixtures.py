"""A tiny but complete job folder for the viewer tests.

The job holds two real pyramidal Aperio-style TIFF slides (readable by OpenSlide), a
feature file per slide written through :mod:`slidevl.features.store`, QuPath-style
tissue contours, a VQA ROI file, a manifest, and a survival run folder with OOF risks,
a summary and per-slide evidence. Everything is derived from the same synthetic tissue
mask so the numbers the tests check (patch counts, tissue areas) are known exactly.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from slidevl.atomic import write_json_atomic
from slidevl.features.store import SlideFeatures, write_slide_features
from slidevl.survival.evidence import prompt_table
from slidevl.tiling.grid import GridSpec, SlideGrid, index_cells

MPP = 0.5
TILE = 256
ENCODER = "toy"
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


def _features(slide: ToySlide, seed: int) -> SlideFeatures:
    grid = SlideGrid(GridSpec(target_mpp=MPP), width=slide.width, height=slide.height, mpp=MPP)
    cells = grid.all_patches()
    boxes = grid.patch_boxes(cells)
    x0, y0, x1, y1 = slide.tissue_box
    inside = (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x1) & (boxes[:, 3] <= y1)
    cells = cells[inside]
    regions, region_index = index_cells(grid.region_of(cells))
    packs, pack_index = index_cells(grid.pack_of(cells))
    rng = np.random.default_rng(seed)
    return SlideFeatures(
        slide_id=slide.slide_id,
        patch_features=rng.normal(size=(len(cells), 8)).astype(np.float32),
        patch_coords=grid.patch_edges(cells),
        patch_grid=cells,
        patch_region=region_index,
        patch_pack=pack_index,
        patch_tissue=np.ones(len(cells), np.float32),
        region_coords=grid.cell_boxes(regions, 16)[:, :2],
        region_grid=regions,
        pack_coords=grid.cell_boxes(packs, 3)[:, :2],
        pack_grid=packs,
        attrs={
            "encoder": ENCODER,
            "mpp": MPP,
            "target_mpp": MPP,
            "patch_size_level0": grid.patch_step,
            "region_size_level0": grid.region_step,
            "pack_size": 3,
        },
    )


def _tissue_geojson(slide: ToySlide) -> dict:
    x0, y0, x1, y1 = slide.tissue_box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {
        "type": "FeatureCollection",
        "features": [{
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
        }],
    }


def _evidence(slide: ToySlide, sf: SlideFeatures, seed: int) -> dict:
    """An evidence record in the survival run's format (:mod:`slidevl.survival.evidence`)."""
    rng = np.random.default_rng(seed)
    n = sf.n_patches
    alignment = rng.random(n)
    kept = alignment >= np.quantile(alignment, 0.4)
    n_regions = len(sf.region_coords)
    return {
        "slide_id": slide.slide_id, "patient_id": f"P{seed:02d}", "model": "hila", "fold": seed,
        "prompts": prompt_table((tuple(PROMPTS[:2]), (PROMPTS[2],)), ("low risk", "high risk")),
        "patch": {"index": list(range(n)), "coords": sf.patch_coords.tolist(), "kept": kept.tolist(),
                  "prompt_index": [(0, 1, 2)[i % 3] for i in range(n)], "alignment": alignment.round(4).tolist()},
        "region": {"coords": sf.region_coords.tolist(), "kept": [True] * n_regions,
                   "prompt_index": [2] * n_regions, "alignment": [0.5] * n_regions},
    }


def _survival_run(run: Path) -> None:
    """OOF risks for a 40-patient cohort that includes the toy slides, plus a summary."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(40):
        slide_id = SLIDES[i].slide_id if i < len(SLIDES) else f"COH-{i:02d}"
        risk = float(rng.normal())
        t = float(np.clip(rng.exponential(30 * np.exp(-0.5 * risk)), 1, 120))
        surv = np.cumprod(1 - np.clip(rng.uniform(0.05, 0.3, 4) * np.exp(0.3 * risk), 0, 0.95))
        rows.append({"patient_id": f"P{i:02d}", "slide_ids": slide_id, "fold": i % 5, "risk": round(risk, 4),
                     "e": int(rng.random() < 0.6), "t": round(t, 2),
                     **{f"surv_{k}": round(float(s), 4) for k, s in enumerate(surv)}})
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "oof_risks.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json_atomic(run / "summary.json", {
        "model": "hila", "c_index_mean": 0.64, "c_index_std": 0.05, "n_folds": 5,
        "bin_edges": [0.0, 12.0, 30.0, 60.0, 120.0],
    })


def _manifest_entry(slide_id: str, path: Path, status: str, *, n_patches: int | None = None, output: str | None = None,
                    tissue: str | None = None, error: str | None = None) -> dict:
    """One entry in the format of :func:`slidevl.features.jobs.rebuild_manifest`."""
    return {"slide_id": slide_id, "status": status, "error": error, "timings": {"open": 0.01},
            "n_patches": n_patches, "n_regions": None, "n_packs": None, "output": output, "tissue": tissue,
            "qc": None, "encoder": ENCODER, "slide_path": str(path), "updated": "2026-01-01T00:00:00+0000"}


def make_job(root: Path, *, with_survival: bool = True) -> dict[str, Path]:
    """Create ``root/job`` (and ``root/run`` if asked); return the paths the tests need."""
    job = root / "job"
    slides_dir = root / "slides"
    entries = []
    for k, slide in enumerate(SLIDES):
        src = write_aperio_tiff(slides_dir / f"{slide.slide_id}.tiff", _render(slide, k))
        sf = _features(slide, k)
        write_slide_features(job / "features" / ENCODER / f"{slide.slide_id}.h5", sf)
        write_json_atomic(job / "tissue" / f"{slide.slide_id}.geojson", _tissue_geojson(slide))
        entries.append(_manifest_entry(slide.slide_id, src, "ok", n_patches=sf.n_patches,
                                       output=f"features/{ENCODER}/{slide.slide_id}.h5",
                                       tissue=f"tissue/{slide.slide_id}.geojson"))
    # A failed slide shows in the list with its error but has nothing to view.
    entries.append(_manifest_entry("BROKEN-03", slides_dir / "BROKEN-03.svs", "failed",
                                   error="OpenSlideUnsupportedFormatError: Unsupported or missing image file"))
    write_json_atomic(job / "manifest.json", {"job": str(job.resolve()), "counts": {"ok": 2, "failed": 1},
                                              "config": {}, "slides": entries})
    write_json_atomic(job / "rois" / f"{SLIDES[0].slide_id}.json", {
        "slide": SLIDES[0].slide_id,
        "rois": [{"id": "roi-1", "bbox": [600, 300, 1400, 900], "label": "tumour nest"},
                 {"id": "roi-2", "bbox": [1600, 1000, 2400, 1700], "label": "stroma"}],
    })
    paths = {"job": job, "slides": slides_dir}
    if with_survival:
        run = root / "run"
        _survival_run(run)
        for k, slide in enumerate(SLIDES):
            sf = _features(slide, k)
            write_json_atomic(run / "evidence" / f"{slide.slide_id}.json", _evidence(slide, sf, k))
        paths["run"] = run
    return paths


def tissue_area_mm2(slide: ToySlide, bbox: tuple[int, int, int, int] | None = None) -> float:
    """Exact tissue area of a toy slide (inside ``bbox`` if given), in mm²."""
    x0, y0, x1, y1 = slide.tissue_box
    if bbox is not None:
        x0, y0 = max(x0, bbox[0]), max(y0, bbox[1])
        x1, y1 = min(x1, bbox[2]), min(y1, bbox[3])
    return max(0, x1 - x0) * max(0, y1 - y0) * (MPP * 1e-3) ** 2


if __name__ == "__main__":  # pragma: no cover - handy for manual viewing: python tests/serve_fixtures.py DIR
    import sys

    print(json.dumps({k: str(v) for k, v in make_job(Path(sys.argv[1])).items()}))
