"""Benchmark the synthetic slide renderer on one core.

Reports, for one slide of ``--px`` level-0 width:

* bank build time (once per cohort, cached afterwards);
* texture renderer throughput (layout -> RGB blocks, no encoding), in Mpx/s;
* end-to-end throughput (render + JPEG tiles + pyramid + TIFF on disk), in Mpx/s;
* peak resident memory, to show that a large slide is never held in RAM.

Usage::

    python benchmarks/synth_render.py --px 30000 [--out /tmp/bench.tiff]

Results go to ``benchmarks/results/synth_render.json`` (``--json`` to put them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from slidevl.atomic import write_json_atomic
from slidevl.synth.classes import FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR
from slidevl.synth.layout import make_layout
from slidevl.synth.model import sample_patients
from slidevl.synth.render import SlideRenderer
from slidevl.synth.stain import sample_stain, stain_lut
from slidevl.synth.textures import texture_bank
from slidevl.synth.tiff import write_slide_tiff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, default=16384, help="level-0 width and height of the slide")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texture-px", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None, help="TIFF path (default: a temporary file, deleted)")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "synth_render.json",
                    help="where to write the results")
    args = ap.parse_args()

    width = height = args.px // 16 * 16
    patient = sample_patients(1, args.seed)[0]
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    for kind in (TUMOUR, STROMA, LYMPHOCYTES, NECROSIS, FAT):
        texture_bank(kind, patient.morphology.grade if kind == TUMOUR else 0, args.seed, args.texture_px)
    t_banks = time.perf_counter() - t0
    rss_banks_mb = _peak_rss_mb()

    t0 = time.perf_counter()
    layout = make_layout(width, height, patient.morphology, rng)
    labels = layout.label_map()
    t_layout = time.perf_counter() - t0
    renderer = SlideRenderer(
        layout, patient.morphology.grade, stain_lut(sample_stain(rng)), args.seed, rng, args.texture_px
    )

    # Render-only throughput over a horizontal band through the middle of the slide
    # (which crosses tissue, tumour and glass), in the writer's block shape.
    band_rows = min(height, 4096)
    y_start = (height - band_rows) // 2 // 256 * 256
    # CPU time as well as wall time: on a shared machine the wall clock measures the
    # neighbours, while CPU time is what one core spends (everything is single-threaded).
    w0, c0 = time.perf_counter(), time.process_time()
    for y0 in range(y_start, y_start + band_rows, 256):
        for x0 in range(0, width, 2048):
            renderer.render(y0, x0, min(256, height - y0), min(2048, width - x0))
    t_render, c_render = time.perf_counter() - w0, time.process_time() - c0
    render_mpx = band_rows * width / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "bench.tiff"
        w0, c0 = time.perf_counter(), time.process_time()
        write_slide_tiff(path, renderer.render, width, height, "aperio")
        t_write, c_write = time.perf_counter() - w0, time.process_time() - c0
        size_mb = path.stat().st_size / 1e6

    mpx = width * height / 1e6
    result = {
        "slide_px": [width, height],
        "tissue_fraction": round(float((labels > 0).mean()), 3),
        "bank_build_s": round(t_banks, 2),
        "layout_and_labels_s": round(t_layout, 2),
        "render_mpx_per_s_wall": round(render_mpx / t_render, 1),
        "render_mpx_per_cpu_s": round(render_mpx / c_render, 1),
        "end_to_end_s_wall": round(t_write, 2),
        "end_to_end_mpx_per_s_wall": round(mpx / t_write, 1),
        "end_to_end_mpx_per_cpu_s": round(mpx / c_write, 1),
        "tiff_mb": round(size_mb, 1),
        "peak_rss_mb_after_banks": round(rss_banks_mb),
        "peak_rss_mb": round(_peak_rss_mb()),
    }
    print(json.dumps(result, indent=2))
    write_json_atomic(args.json, result)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
