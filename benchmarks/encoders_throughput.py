"""Foundation-model tile encoding, read + transform + encode, against the raw read rate.

One run, one synthetic slide (:mod:`slidevl.synth`, Aperio layout, 0.5 µm/px), one list
of 256 px tissue tiles at 0.5 µm/px. It measures

1. the raw read rate: plain ``OpenSlide.read_region`` of those tiles in one process,
   and the same reads spread over the DataLoader workers (no transform), which is the
   most the encoding path can reach with that many workers;
2. tiles/s through the preprocess path: :class:`slidevl.features.tiles.WorkItemDataset`
   reads and runs the encoder's ``worker_transform`` in the workers (pinned memory on
   CUDA), the main process encodes, reading overlapping encoding; plus the share of the
   wall time the main process spent inside ``encode`` (near 100 %: the model is the
   bottleneck; lower: it waited for tiles);

for ``uni`` (ViT-L/16) and ``gigapath`` (timm's ViT-g/14 DINOv2 body with 16 px
patches, GigaPath's tile encoder) built by :mod:`slidevl.features.encoders.timm_presets` with
random weights (throughput does not depend on their values), saved in the hub's layout
and loaded through the preset as a user's ``--encoder uni:PATH`` would be, so the
authors' per-tile preprocessing is timed too. ``handcrafted`` runs the same path as a
reference. Devices: the CPU, and CUDA where available, once in fp32 and once with bf16
autocast (the default there).

CPU (2 cores: a few minutes; ViT-g on CPU is slow, so it gets few tiles)::

    python benchmarks/encoders_throughput.py

writes ``benchmarks/results/encoders_throughput.{json,md}``. On a GPU machine (the
device tool; its image has torch and torchvision but not OpenSlide or imagecodecs, and
may hold an older timm, so their wheels travel along: run
``python benchmarks/encoders_throughput.py --fetch-wheels`` here once, which fills the
git-ignored ``benchmarks/work/wheels``, 31 MB), one call, stopped at 560 s if it runs long::

    run(carry=["benchmarks/work/wheels"], timeout_s=600, command=
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
        " benchmarks/work/wheels/*.whl && nvidia-smi -L && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:src timeout 560"
        " python3 benchmarks/encoders_throughput.py --slide-px 16384 --tiles 2048 --cpu-tiles-uni 64"
        " --cpu-tiles-gigapath 16 --name encoders_throughput_cuda --results $OUT")

and copy ``encoders_throughput_cuda.{json,md}`` from the returned files into
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WHEELS = Path(__file__).resolve().parent / "work" / "wheels"
# What the device machine lacks (see the module docstring): OpenSlide, imagecodecs (the
# synthetic slide is JPEG-compressed by tifffile) and a timm that
# knows the presets' kwargs. Python 3.12 manylinux wheels, as that image runs.
DEVICE_WHEELS = ("openslide-python==1.4.7", "openslide-bin==4.0.1.2", "imagecodecs==2026.3.6", "timm==1.0.31")
PRESET_NAMES = ("uni", "gigapath")


def fetch_wheels(folder: Path) -> None:
    """Download the wheels the device machine needs into ``folder`` (PyPI, here)."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12",
         "--implementation=cp", *platforms, "-d", str(folder), *DEVICE_WHEELS],
        check=True,
    )


def tissue_boxes(slide_path: Path) -> tuple[np.ndarray, int]:
    """Level-0 boxes of the 256 px, 0.5 µm/px grid patches the pipeline would keep, and their level."""
    from slidevl.features.config import PreprocessConfig
    from slidevl.slide.mpp import resolve_mpp
    from slidevl.slide.reader import open_slide
    from slidevl.slide.tissue import segment_slide
    from slidevl.tiling.grid import SlideGrid

    cfg = PreprocessConfig()
    with open_slide(slide_path) as slide:
        mpp = resolve_mpp(slide, slide_path.stem, None, None).mpp
        tissue, _ = segment_slide(slide, mpp, cfg.tissue)
        grid = SlideGrid(cfg.grid, slide.dimensions[0], slide.dimensions[1], mpp)
        level = slide.best_level(grid.patch_step / cfg.grid.patch_px)
    fractions = tissue.patch_fractions(grid)
    rows, cols = np.nonzero(fractions >= cfg.min_tissue)
    return grid.patch_boxes(np.stack([cols, rows], axis=1)), level


def take(boxes: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` boxes, cycling through them again when the slide has fewer."""
    return boxes[np.arange(n) % len(boxes)]


def raw_read_rate(slide_path: Path, boxes: np.ndarray, level: int) -> dict[str, Any]:
    """Plain OpenSlide ``read_region`` of level-0 ``boxes`` at ``level``, in this process."""
    import openslide

    osr = openslide.OpenSlide(str(slide_path))
    ds = osr.level_downsamples[level]
    start = time.perf_counter()
    for x0, y0, x1, y1 in boxes.astype(int).tolist():
        size = (max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds)))
        np.asarray(osr.read_region((x0, y0), level, size))
    seconds = time.perf_counter() - start
    osr.close()
    return {"tiles": len(boxes), "seconds": seconds, "tiles_per_s": len(boxes) / seconds}


def _tile_count(tiles: np.ndarray) -> int:
    # Read-only runs return a count, so no pixels cross the process boundary.
    return len(tiles)


def loader_run(slide_path: Path, boxes: np.ndarray, level: int, batch: int, workers: int,
               transform: Callable[[np.ndarray], Any], encode: Callable[[Any], Any] | None,
               pin_memory: bool) -> dict[str, Any]:
    """Tiles/s through the preprocess DataLoader, and the seconds spent in ``encode``."""
    from slidevl.features.tiles import WorkItemDataset, iterate_items, patch_items

    items = patch_items(boxes, np.arange(len(boxes)), 256, level, batch)
    dataset = WorkItemDataset(slide_path, items, transform)
    encode_s = encode_cpu_s = 0.0
    n = 0
    start = time.perf_counter()
    for result in iterate_items(dataset, workers, pin_memory=pin_memory):
        if result["error"]:
            raise RuntimeError(result["error"])
        rows, transformed = result["patch"]
        if encode is not None:
            t, c = time.perf_counter(), time.process_time()
            encode(transformed)
            encode_s += time.perf_counter() - t
            encode_cpu_s += time.process_time() - c
        n += len(rows)
    wall = time.perf_counter() - start
    return {"tiles": n, "seconds": wall, "tiles_per_s": n / wall, "encode_s": encode_s, "encode_share": encode_s / wall,
            "encode_tiles_per_s": n / encode_s if encode_s else None,
            # CPU seconds of this process (all its threads) per encoded tile: on a shared
            # machine, the cost of the CPU forward pass that other jobs do not inflate.
            "encode_cpu_s_per_tile": encode_cpu_s / n if n else None}


def save_random_weights(name: str, folder: Path) -> Path:
    """The preset's architecture with random weights, saved as its hub repository ships it."""
    import torch

    from slidevl.features.encoders.presets import PRESETS
    from slidevl.features.encoders.timm_presets import build_timm_model

    preset = PRESETS[name]
    model_dir = folder / name
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(build_timm_model(preset).state_dict(), model_dir / preset.weight_files[0])
    return model_dir


def encoder_runs(name: str, model_dir: Path | None, devices: Iterable[str], tiles_for: Callable[[str, str], int],
                 args: argparse.Namespace, slide_path: Path, boxes: np.ndarray, level: int) -> list[dict[str, Any]]:
    """One row per (device, precision) for encoder ``name``."""
    import torch

    from slidevl.features.encoders import get_encoder

    rows = []
    for device in devices:
        t = time.perf_counter()
        encoder = get_encoder(name if model_dir is None else f"{name}:{model_dir}", device=device)
        load_s = time.perf_counter() - t
        precisions = ("fp32", "bf16") if device == "cuda" and model_dir is not None else ("fp32",)
        for precision in precisions:
            if model_dir is not None:
                encoder.set_precision(precision)
            n = tiles_for(name, device)
            batch = args.batch if device == "cuda" or model_dir is None else args.cpu_batch
            # Warm-up outside the timing: CUDA context, cuBLAS handles, first-call allocations.
            encoder.encode(encoder.worker_transform(np.zeros((min(batch, n), 256, 256, 3), np.uint8)))
            run = loader_run(slide_path, take(boxes, n), level, batch, args.workers, encoder.worker_transform,
                             encoder.encode, pin_memory=device == "cuda")
            row = {"encoder": name, "device": device, "precision": precision if model_dir is not None else "—",
                   "feature_dim": encoder.feature_dim, "batch": batch, "workers": args.workers,
                   "load_s": load_s, **run}
            if model_dir is not None:
                row["params_m"] = sum(p.numel() for p in encoder.model.parameters()) / 1e6
            if device == "cuda":
                row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            print(f"{name} {device} {row['precision']}: {run['tiles_per_s']:.2f} tiles/s over {n} tiles "
                  f"(encode {run['encode_share']:.0%} of the time)", flush=True)
            rows.append(row)
        del encoder
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def machine() -> dict[str, Any]:
    import timm
    import torch

    from slidevl.cpus import available_cpus

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or platform.machine())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model,
        "cpus_usable": available_cpus(), "memory_gib": round(mem_gib, 1), "torch": torch.__version__,
        "timm": timm.__version__, "torch_threads": torch.get_num_threads(), "load_average_1_5_15": list(os.getloadavg()),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    raw, parallel = result["raw_read"], result["parallel_read"]
    lines = [
        "# Foundation-model tile encoding throughput",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, {m['memory_gib']:.0f} GiB, {gpu}; {m['platform']}, "
        f"python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), timm {m['timm']}; load average "
        f"{', '.join(f'{v:.1f}' for v in m['load_average_1_5_15'])} at the end (a shared machine slows runs down).",
        "",
        f"Tiles: {result['tissue_tiles']} distinct 256 px tissue tiles at 0.5 µm/px (level {result['level']}) of a "
        f"{result['slide_px']} px synthetic Aperio slide; runs needing more cycle through them again. Random weights, "
        "loaded through the presets (`uni:PATH`, `gigapath:PATH`), so the authors' per-tile preprocessing runs in "
        f"the {result['workers']} DataLoader workers; CUDA runs read into pinned memory.",
        "",
        f"Raw read rate of the same tiles: **{raw['tiles_per_s']:,.0f} tiles/s** with `OpenSlide.read_region` in one "
        f"process ({raw['tiles']} tiles); {parallel['tiles_per_s']:,.0f} tiles/s read by the {result['workers']} "
        f"workers through the pipeline's DataLoader with no transform ({parallel['tiles']} tiles).",
        "",
        "tiles/s = read + transform + encode, wall time, loader start included. encode share = the part of that "
        "time the main process spent encoding (near 100 %: the model is the limit; lower: it waited for tiles); "
        "encode-only tiles/s = tiles over that time alone. encode CPU-s/tile = CPU seconds of the main process (all "
        "its threads) per tile while encoding, which other jobs on a shared machine do not inflate.",
        "",
        "| encoder | params (M) | dim | device | precision | batch | tiles | tiles/s | × raw read | encode share | "
        "encode-only tiles/s | encode CPU-s/tile | peak GPU GiB |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        params = f"{r['params_m']:,.0f}" if "params_m" in r else "—"
        peak = f"{r['peak_gpu_mem_gib']:.1f}" if "peak_gpu_mem_gib" in r else "—"
        lines.append(
            f"| {r['encoder']} | {params} | {r['feature_dim']} | {r['device']} | {r['precision']} | {r['batch']} | "
            f"{r['tiles']} | {_sig(r['tiles_per_s'])} | {_sig(r['tiles_per_s'] / raw['tiles_per_s'])} | "
            f"{r['encode_share']:.0%} | {_sig(r['encode_tiles_per_s'])} | {_sig(r['encode_cpu_s_per_tile'])} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def _sig(value: float | None) -> str:
    """Three significant digits (rates here span 0.05 to thousands of tiles/s)."""
    if not value:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide-px", type=int, default=8192, help="edge of the synthetic slide (level 0, 0.5 µm/px)")
    parser.add_argument("--tiles", type=int, default=256,
                        help="tiles per CUDA run, for handcrafted and for the raw read rates")
    parser.add_argument("--cpu-tiles-uni", type=int, default=24, help="tiles for ViT-L on the CPU")
    parser.add_argument("--cpu-tiles-gigapath", type=int, default=6, help="tiles for ViT-g on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="tiles per batch on CUDA (default: preprocess's)")
    parser.add_argument("--cpu-batch", type=int, default=4,
                        help="tiles per batch for the ViTs on the CPU (small, so few tiles still make several batches)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: preprocess's)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, and cuda if present)")
    parser.add_argument("--name", default="encoders_throughput", help="result file stem")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--workdir", type=Path, default=None, help="slide and weights go here (default: a temp dir)")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"only download the device wheels into {WHEELS}")
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels(WHEELS)
        return

    import torch

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.features.config import PreprocessConfig, default_workers

    args.batch = args.batch or PreprocessConfig.batch_size
    args.workers = default_workers() if args.workers is None else args.workers
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slidevl-encbench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        from slidevl.synth.cohort import render_slide
        slide_path = render_slide(work / f"bench_{args.slide_px}.svs", args.slide_px)
        boxes, level = tissue_boxes(slide_path)
        print(f"slide {args.slide_px} px: {len(boxes)} tissue tiles ({time.perf_counter() - t:.0f} s)", flush=True)
        read_boxes = take(boxes, args.tiles)
        raw = raw_read_rate(slide_path, read_boxes, level)
        parallel = loader_run(slide_path, read_boxes, level, args.batch, args.workers, _tile_count, None, False)
        print(f"raw read {raw['tiles_per_s']:.0f} tiles/s; {args.workers} workers {parallel['tiles_per_s']:.0f} tiles/s",
              flush=True)

        cpu_tiles = {"uni": args.cpu_tiles_uni, "gigapath": args.cpu_tiles_gigapath}

        def tiles_for(name: str, device: str) -> int:
            return cpu_tiles[name] if device == "cpu" and name in cpu_tiles else args.tiles

        runs = encoder_runs("handcrafted", None, ["cpu"], tiles_for, args, slide_path, boxes, level)
        for name in PRESET_NAMES:
            model_dir = save_random_weights(name, work / "weights")
            runs += encoder_runs(name, model_dir, devices, tiles_for, args, slide_path, boxes, level)
            shutil.rmtree(model_dir)  # ViT-g's file is 4.5 GB
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "encoders_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "benchmarks/encoders_throughput.py", *sys.argv[1:]]),
        "machine": machine(),
        "slide_px": args.slide_px,
        "level": level,
        "tissue_tiles": len(boxes),
        "workers": args.workers,
        "raw_read": raw,
        "parallel_read": parallel,
        "runs": runs,
    }
    write_json_atomic(args.results / f"{args.name}.json", result)
    write_text_atomic(args.results / f"{args.name}.md", render_markdown(result))
    print(render_markdown(result))


if __name__ == "__main__":
    main()
