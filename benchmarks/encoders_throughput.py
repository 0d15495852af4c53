"""Tile-encoder throughput on one CPU core.

Measures tiles/s of ``handcrafted`` and, for reference, of small ``hf:`` ViTs built from
configs (random weights: cost does not depend on their values), on procedural H&E-like
256 px tiles. ``worker_transform`` (runs in DataLoader workers) and ``encode`` (main
process) are timed separately. Each figure is the best of several repeats, in CPU time
of this process (robust to other jobs sharing the machine) and in wall time.

Writes ``benchmarks/results/encoders_throughput.json`` and ``.md``.

    python benchmarks/encoders_throughput.py [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import os

# One core: pin every thread pool before numpy / torch load their libraries.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.progress import Progress

from slidevl.atomic import write_json_atomic, write_text_atomic
from slidevl.features.encoders import TileEncoder, get_encoder
from slidevl.features.encoders.synthetic import TILE_CLASSES, synthetic_tiles

RESULTS = Path(__file__).resolve().parent / "results"
# Per-stage budget implied by the pipeline goal: preprocessing at >= 0.7 of a raw read
# rate of up to ~1,000 tiles/s per worker.
TARGET_TILES_PER_S = 1500


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best CPU and wall seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def _tiny_vit(hidden: int, layers: int, heads: int, image: int, patch: int) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tempfile.mkdtemp(prefix=f"vit{hidden}x{layers}-")
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image,
        patch_size=patch,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image, "width": image}).save_pretrained(folder)
    return folder


def measure(label: str, encoder: TileEncoder, tiles: np.ndarray, repeats: int) -> dict[str, Any]:
    transformed = encoder.worker_transform(tiles)
    n = len(tiles)
    t_cpu, t_wall = _best(lambda: encoder.worker_transform(tiles), repeats)
    e_cpu, e_wall = _best(lambda: encoder.encode(transformed), repeats)
    return {
        "encoder": label,
        "name": encoder.name,
        "feature_dim": encoder.feature_dim,
        "input_size": encoder.input_size,
        "batch": n,
        "worker_transform_tiles_per_s_cpu": n / t_cpu,
        "encode_tiles_per_s_cpu": n / e_cpu,
        "total_tiles_per_s_cpu": n / (t_cpu + e_cpu),
        "total_tiles_per_s_wall": n / (t_wall + e_wall),
        "us_per_tile_cpu": 1e6 * (t_cpu + e_cpu) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    per_class = -(-args.batch // len(TILE_CLASSES))
    tiles = np.concatenate([synthetic_tiles(k, per_class, 256, seed=i) for i, k in enumerate(TILE_CLASSES)])[: args.batch]
    cases: list[tuple[str, Callable[[], TileEncoder]]] = [
        ("handcrafted", lambda: get_encoder("handcrafted")),
        ("hf ViT d=32 L=2 @64px (test size)", lambda: get_encoder("hf:" + _tiny_vit(32, 2, 4, 64, 16))),
        ("hf ViT-Ti/16 d=192 L=12 @224px", lambda: get_encoder("hf:" + _tiny_vit(192, 12, 3, 224, 16))),
    ]
    rows = []
    with Progress() as progress:
        task = progress.add_task("encoders", total=len(cases))
        for label, build in cases:
            progress.update(task, description=label)
            rows.append(measure(label, build(), tiles, args.repeats))
            progress.advance(task)

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": 1,
        "target_tiles_per_s": TARGET_TILES_PER_S,
    }
    write_json_atomic(RESULTS / "encoders_throughput.json", {"meta": meta, "results": rows})
    lines = [
        "# Tile encoder throughput (one CPU core, 256 px tiles)",
        "",
        f"Best of {args.repeats} repeats, batch {args.batch}, load average {meta['load_average_1min']:.1f} "
        f"on {meta['cpu_count']} cores. CPU-time rates are what one dedicated core sustains; wall-time "
        "rates include waiting for other jobs on this machine.",
        "",
        "| encoder | dim | worker_transform tiles/s | encode tiles/s | total tiles/s (CPU) | total tiles/s (wall) | µs/tile |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['feature_dim']} | {r['worker_transform_tiles_per_s_cpu']:,.0f} | "
            f"{r['encode_tiles_per_s_cpu']:,.0f} | {r['total_tiles_per_s_cpu']:,.0f} | "
            f"{r['total_tiles_per_s_wall']:,.0f} | {r['us_per_tile_cpu']:,.0f} |"
        )
    lines += ["", f"Target for `handcrafted`: ≥ {TARGET_TILES_PER_S:,} tiles/s on one core.", ""]
    write_text_atomic(RESULTS / "encoders_throughput.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
