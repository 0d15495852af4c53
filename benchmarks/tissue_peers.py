"""Tissue detection + tiling against a public tiler (hs2p), on the same slides in one run.

Canonical result ``benchmarks/results/tissue_peers.{json,md}``, regenerated (after installing
the peer, below) by::

    python benchmarks/tissue_peers.py

For every slide of a synthetic cohort with planted fat (:mod:`slidevl.synth`, 0.5 µm/px,
``truth``: ``labels/<slide>.png`` at 16x) this times, interleaved, ``--repeats`` times each
(the median is reported, wall-clock and CPU seconds of the process: CPU time, all threads
together, is what other jobs on a shared machine inflate least):

* **slidevl**: open, segment (default :class:`TissueParams`, adipose recovery on), lay the
  256 px grid and keep patches with >= 25% tissue: the tissue + tiling part of ``preprocess``
  (writing the GeoJSON and QC picture is left out, as hs2p writes nothing either);
* **slidevl, no adipose recovery** (``adipose_radius_um=0``), to show what recovery costs;
* **hs2p** ``tile_slide`` (the fastest PyPI tiler with tissue detection found: OpenCV HSV
  or Otsu on a low-resolution level, then tile coordinates), with its default segmentation
  (HSV, downsample 64) and with Otsu at our 16x, both with 256 px tiles at 0.5 µm/px and
  25% minimum tissue, one worker.

Masks are compared on our 16x overview (hs2p's segmentation function applied to it): IoU on
plain tissue (planted fat left out of both), and the share of the planted fat area each covers.
For slidevl, also the megapixels of membranes read at each pyramid level, which is what
adipose recovery costs.

Install the peer first (benchmark only, not a slidevl dependency; ``--no-deps`` keeps
wandb and friends out, hs2p imports without them)::

    .venv/bin/pip install --no-deps hs2p==6.1.0 && .venv/bin/pip install omegaconf

``--slide-px`` (default 20,000), ``--patients`` (default 2) and ``--workdir`` change the cohort.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MIN_TISSUE = 0.25
MPP = 0.5


def ours(path: Path, adipose: bool) -> tuple[float, float, np.ndarray, np.ndarray, int, dict]:
    """Wall and CPU seconds, mask, overview, kept patches and adipose reads of our tissue + tiling step."""
    from slidevl.slide.reader import open_slide
    from slidevl.slide.tissue import TissueParams, segment_slide
    from slidevl.tiling.grid import GridSpec, SlideGrid

    params = TissueParams() if adipose else TissueParams(adipose_radius_um=0)
    start, cpu = time.perf_counter(), time.process_time()
    with open_slide(path) as slide:
        tissue, overview = segment_slide(slide, MPP, params)
        grid = SlideGrid(GridSpec(target_mpp=MPP, patch_px=256), slide.dimensions[0], slide.dimensions[1], MPP)
        downsamples = slide.level_downsamples
    fractions = tissue.patch_fractions(grid)
    kept = int(((fractions >= MIN_TISSUE) & (fractions > 0)).sum())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Megapixels read per level: the share of the overview read, at that level's pixel size.
    overview_px = tissue.mask.size * tissue.scale_x * tissue.scale_y
    info = {"overview_mpx": tissue.mask.size / 1e6,
            "adipose_levels": list(tissue.adipose_levels), "adipose_read_fraction": list(tissue.adipose_read),
            "adipose_read_mpx": [f * overview_px / downsamples[lv] ** 2 / 1e6
                                 for lv, f in zip(tissue.adipose_levels, tissue.adipose_read)]}
    return seconds, cpu, tissue.mask, overview, kept, info


def hs2p_run(path: Path, method: str, downsample: int | None) -> tuple[float, float, int]:
    """Wall and CPU seconds and tile count of hs2p's ``tile_slide`` (coordinates only, nothing written)."""
    from hs2p import MaskSamplingConfig, SegmentationConfig, SlideSpec, TilingConfig, tile_slide

    seg = SegmentationConfig(method=method) if downsample is None else SegmentationConfig(method=method, downsample=downsample)
    masks = MaskSamplingConfig(pixel_mapping={"background": (0,), "tissue": (1,)}, min_coverage={"tissue": MIN_TISSUE},
                               output_mode="per_annotation", strategy="joint")
    start, cpu = time.perf_counter(), time.process_time()
    result = tile_slide(SlideSpec(sample_id=path.stem, image_path=path, spacing_at_level_0=MPP),
                        tiling=TilingConfig(requested_spacing_um=MPP, requested_tile_size_px=256, tolerance=0.05,
                                            overlap=0.0, backend="openslide"),
                        segmentation=seg, masks=masks, num_workers=1)
    return time.perf_counter() - start, time.process_time() - cpu, len(result.tiles.x)


def hs2p_mask(overview: np.ndarray, method: str) -> np.ndarray:
    from hs2p import SegmentationConfig
    from hs2p.segmentation import segment_tissue_image

    return segment_tissue_image(overview, config=SegmentationConfig(method=method)) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def render_markdown(result: dict) -> str:
    m = result["machine"]
    loads = ", ".join(f"{v:.1f}" for v in m["load_average_1_5_15_start"])
    loads_end = ", ".join(f"{v:.1f}" for v in m["load_average_1_5_15"])
    lines = [
        "# Tissue detection + tiling: slidevl against hs2p",
        "",
        f"Machine: {m['cpus']} CPUs ({m['platform']}), python {m['python']}, load average {loads} at the start and "
        f"{loads_end} at the end (a shared machine: other jobs slow wall-clock times; CPU seconds suffer less). "
        f"hs2p {result['hs2p_version']}. Synthetic cohort from `slidevl.synth` ({result['slide_px']} px slides, "
        f"0.5 µm/px, planted fat). Median of {result['repeats']} interleaved runs per slide and method.",
        "",
        "Time = open + tissue detection + 256 px grid at 0.5 µm/px + patches with >= 25% tissue, wall-clock "
        "(CPU seconds of all threads in brackets). IoU is on plain tissue (planted fat left out of both masks), "
        "against hs2p's mask on the same 16x overview; fat = share of the planted fat area inside the mask.",
        "",
        "| slide | slidevl s | slidevl no-adipose s | hs2p default s | hs2p otsu 16x s | patches (ours / hs2p default) "
        "| IoU vs hs2p hsv | IoU vs hs2p otsu | fat: slidevl | fat: no adipose | fat: hs2p hsv | fat: hs2p otsu "
        "| membranes read, Mpx (2 µm, 0.5 µm) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["slides"]:
        lines.append(
            f"| {r['slide']} | {r['ours_s']:.2f} ({r['ours_cpu_s']:.2f}) | {r['ours_plain_s']:.2f} "
            f"({r['ours_plain_cpu_s']:.2f}) | {r['hs2p_default_s']:.2f} ({r['hs2p_default_cpu_s']:.2f}) | "
            f"{r['hs2p_otsu16_s']:.2f} ({r['hs2p_otsu16_cpu_s']:.2f}) | {r['ours_patches']} / {r['hs2p_default_tiles']} | "
            f"{r['iou_plain_hsv']:.3f} | {r['iou_plain_otsu']:.3f} | {r['fat_ours']:.3f} | {r['fat_ours_plain']:.3f} | "
            f"{r['fat_hs2p_hsv']:.3f} | {r['fat_hs2p_otsu']:.3f} | {', '.join(f'{v:.1f}' for v in r['adipose_read_mpx'])} |"
        )
    t = result["totals"]
    lines += [
        "",
        f"Totals (sums of the medians): slidevl {t['ours_s']:.2f} s ({t['ours_cpu_s']:.2f} CPU), without adipose "
        f"recovery {t['ours_plain_s']:.2f} s ({t['ours_plain_cpu_s']:.2f}), hs2p default {t['hs2p_default_s']:.2f} s "
        f"({t['hs2p_default_cpu_s']:.2f}), hs2p Otsu 16x {t['hs2p_otsu16_s']:.2f} s ({t['hs2p_otsu16_cpu_s']:.2f}); "
        f"slidevl / hs2p Otsu 16x = {t['ours_s'] / t['hs2p_otsu16_s']:.2f} wall, "
        f"{t['ours_cpu_s'] / t['hs2p_otsu16_cpu_s']:.2f} CPU; slidevl without adipose recovery / hs2p Otsu 16x = "
        f"{t['ours_plain_s'] / t['hs2p_otsu16_s']:.2f} wall; slidevl / hs2p default = {t['ours_s'] / t['hs2p_default_s']:.1f}.",
        "",
        f"Where slidevl's time goes: without adipose recovery it reads what hs2p reads at 16x, the overview "
        f"({sum(r['overview_mpx'] for r in result['slides']):.1f} Mpx for the {len(result['slides'])} slides; hs2p's "
        f"default reads a 64x thumbnail, 16x fewer pixels). Adipose recovery adds the membranes of the fat: "
        f"{sum(sum(r['adipose_read_mpx']) for r in result['slides']):.1f} Mpx of finer levels, which is what "
        "finding fat by its membranes costs (a threshold of any overview loses it: see the fat columns). "
        "slidevl reads tiled TIFF levels through tifffile where it gives OpenSlide's pixels "
        "(`slidevl.slide.tiffreads`); hs2p reads through OpenSlide here.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide-px", type=int, default=20000, help="level-0 width of the synthetic slides")
    parser.add_argument("--patients", type=int, default=2, help="patients in the cohort (about 1.5 slides each)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per slide and method (median kept)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the cohort goes (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()

    from importlib.metadata import version

    from PIL import Image

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.synth import make_cohort
    from slidevl.synth.classes import BACKGROUND, FAT

    load_start = list(os.getloadavg())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slidevl-peers-"))
    cohort = work / f"cohort_{args.slide_px}"
    if not (cohort / "truth.json").is_file():
        make_cohort(cohort, n_patients=args.patients, n_folds=2, seed=0, slide_px=args.slide_px, progress=False)
    rows = []
    for path in sorted((cohort / "slides").iterdir()):
        labels = np.asarray(Image.open(cohort / "labels" / f"{path.stem}.png"))
        fat, tissue = labels == FAT, labels != BACKGROUND
        runs: dict[str, list] = {"ours": [], "plain": [], "hs2p_default": [], "hs2p_otsu16": []}
        for _ in range(args.repeats):
            runs["ours"].append(ours(path, adipose=True))
            runs["plain"].append(ours(path, adipose=False))
            runs["hs2p_default"].append(hs2p_run(path, "hsv", None))
            runs["hs2p_otsu16"].append(hs2p_run(path, "otsu", 16))
        wall = {k: float(np.median([r[0] for r in v])) for k, v in runs.items()}
        cpu = {k: float(np.median([r[1] for r in v])) for k, v in runs.items()}
        # Masks, counts and reads are the same in every run.
        _, _, mask, overview, kept, info = runs["ours"][0]
        plain_mask = runs["plain"][0][2]
        if mask.shape != fat.shape:
            raise SystemExit(f"{path.name}: mask {mask.shape} and truth {fat.shape} differ; use the default 16x overview")
        theirs = {method: hs2p_mask(overview, method) for method in ("hsv", "otsu")}
        rows.append({
            "slide": path.stem,
            "fat_px": int(fat.sum()), "tissue_px": int(tissue.sum()),
            "ours_s": wall["ours"], "ours_plain_s": wall["plain"],
            "hs2p_default_s": wall["hs2p_default"], "hs2p_otsu16_s": wall["hs2p_otsu16"],
            "ours_cpu_s": cpu["ours"], "ours_plain_cpu_s": cpu["plain"],
            "hs2p_default_cpu_s": cpu["hs2p_default"], "hs2p_otsu16_cpu_s": cpu["hs2p_otsu16"],
            "ours_patches": kept, "hs2p_default_tiles": runs["hs2p_default"][0][2],
            "hs2p_otsu16_tiles": runs["hs2p_otsu16"][0][2],
            "iou_plain_hsv": _iou(mask & ~fat, theirs["hsv"] & ~fat),
            "iou_plain_otsu": _iou(mask & ~fat, theirs["otsu"] & ~fat),
            "fat_ours": float(mask[fat].mean()), "fat_ours_plain": float(plain_mask[fat].mean()),
            "fat_hs2p_hsv": float(theirs["hsv"][fat].mean()), "fat_hs2p_otsu": float(theirs["otsu"][fat].mean()),
            "glass_ours": float(mask[~tissue].mean()), "glass_hs2p_hsv": float(theirs["hsv"][~tissue].mean()),
            **info,
        })
        print(f"{path.stem}: slidevl {rows[-1]['ours_s']:.2f}s, hs2p {rows[-1]['hs2p_default_s']:.2f}s "
              f"(otsu 16x {rows[-1]['hs2p_otsu16_s']:.2f}s), IoU {rows[-1]['iou_plain_hsv']:.3f}, "
              f"fat {rows[-1]['fat_ours']:.3f} vs {rows[-1]['fat_hs2p_hsv']:.3f}", flush=True)
    keys = ("ours_s", "ours_plain_s", "hs2p_default_s", "hs2p_otsu16_s",
            "ours_cpu_s", "ours_plain_cpu_s", "hs2p_default_cpu_s", "hs2p_otsu16_cpu_s")
    totals = {k: sum(r[k] for r in rows) for k in keys}
    result = {
        "benchmark": "tissue_peers",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1_5_15_start": load_start, "load_average_1_5_15": list(os.getloadavg())},
        "hs2p_version": version("hs2p"),
        "slide_px": args.slide_px,
        "repeats": args.repeats,
        "slides": rows,
        "totals": totals,
    }
    write_json_atomic(args.out / "tissue_peers.json", result)
    write_text_atomic(args.out / "tissue_peers.md", render_markdown(result))
    print(f"results: {args.out / 'tissue_peers.md'}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
