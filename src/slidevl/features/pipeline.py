"""``preprocess``: slides -> tissue masks, QC pictures and multi-scale feature files.

Per slide: open (OpenSlide, tifffile fallback), resolve the mpp, segment tissue on a
low-resolution overview, lay the global grid, keep patches by tissue fraction, read
and encode patches and 3x3 pack images in DataLoader workers while the main process
encodes, pool regions with the region encoder, encode the thumbnail, and write the
feature file atomically. Every slide's outcome goes to its own status file; a failure
is recorded and the batch goes on.
"""

from __future__ import annotations

import glob
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slidevl import __version__
from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.features import jobs
from slidevl.features.config import PreprocessConfig
from slidevl.features.hierarchy import build_hierarchy, encode_regions, to_numpy
from slidevl.features.store import SCHEMA_VERSION, FeatureStore, SlideFeatures
from slidevl.features.tiles import BoxBatchDataset, iterate_batches, make_batches
from slidevl.slide.geojson import mask_polygons, tissue_geojson
from slidevl.slide.mpp import mpp_request, resolve_mpp
from slidevl.slide.qc import render_qc
from slidevl.slide.reader import SlideReadError, open_slide
from slidevl.slide.tissue import segment_slide
from slidevl.tiling.grid import SlideGrid


class NoTissueError(RuntimeError):
    """Segmentation found no patch with enough tissue."""


@dataclass
class SlideResult:
    """What happened to one slide in this run."""

    slide_id: str
    path: Path
    status: str  # ok | failed | skipped
    error: str | None = None
    n_patches: int | None = None
    output: Path | None = None
    seconds: float = 0.0


@dataclass
class JobReport:
    """Outcome of a :func:`preprocess` call (this shard's slides only)."""

    job_dir: Path
    encoder: str
    feature_dir: Path
    results: list[SlideResult] = field(default_factory=list)
    manifest: Path | None = None
    summary: Path | None = None

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_ok(self) -> int:
        return self._count("ok")

    @property
    def n_failed(self) -> int:
        return self._count("failed")

    @property
    def n_skipped(self) -> int:
        return self._count("skipped")

    @property
    def exit_code(self) -> int:
        """0 when every slide is ok or skipped, 1 when at least one failed."""
        return 1 if self.n_failed else 0


@dataclass
class Encoders:
    """The tile encoder (patches, packs, thumbnail) and the region encoder of a run."""

    tile: Any
    region: Any

    @property
    def folder(self) -> str:
        from slidevl.features.encoders.base import safe_name

        return safe_name(self.tile.name)

    def describe(self) -> dict[str, Any]:
        return {
            "encoder": self.tile.name,
            "encoder_revision": self.tile.revision,
            "input_size": int(self.tile.input_size),
            "feature_dim": int(self.tile.feature_dim),
            "region_encoder": self.region.name,
            "region_encoder_revision": self.region.revision,
        }


def load_encoders(config: PreprocessConfig) -> Encoders:
    """Instantiate the configured tile and region encoders."""
    from slidevl.features.encoders import get_encoder, get_region_encoder

    return Encoders(tile=get_encoder(config.encoder, device=config.device), region=get_region_encoder(config.region_encoder))


def fingerprint(config: PreprocessConfig, encoders: Encoders, slide_id: str, slide_path: Path) -> dict[str, Any]:
    """Everything that decides a slide's feature file; a change re-runs the slide."""
    return jobs.normalise(
        {
            "schema_version": SCHEMA_VERSION,
            **encoders.describe(),
            "grid": config.grid.as_dict(),
            "tissue": config.tissue.as_dict(),
            "min_tissue": config.min_tissue,
            "mpp": mpp_request(slide_id, config.mpp_override, config.mpp_table),
            "pack_features": config.pack_features,
            "global_feature": config.global_feature,
            "float16": config.float16,
            "slide_bytes": slide_path.stat().st_size if slide_path.exists() else None,
        }
    )


def _remove_stale_partials(paths: Sequence[Path]) -> None:
    # A SIGKILL skips atomic_path's cleanup; the temporaries of this slide are garbage.
    for target in paths:
        for stale in glob.glob(str(target.parent / f".{glob.escape(target.name)}.*.partial")):
            Path(stale).unlink(missing_ok=True)


def thumbnail_square(overview: np.ndarray, size: int) -> np.ndarray:
    """Whole-slide overview padded to a square with white, resized to ``size`` px."""
    h, w = overview.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = overview
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BOX))


class _Progress:
    """Rich progress with a slide bar and a tile bar (silent when disabled)."""

    def __init__(self, console: Console, enabled: bool, n_slides: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.slides = self.progress.add_task("slides", total=n_slides)
        self.tiles = self.progress.add_task("tiles", total=0)

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start_slide(self, slide_id: str) -> None:
        self.progress.update(self.slides, description=f"slides ({slide_id})")
        self.progress.reset(self.tiles, total=0, description="tiles")

    def tiles_total(self, total: int) -> None:
        self.progress.reset(self.tiles, total=total, description="tiles")

    def tiles_done(self, n: int) -> None:
        self.progress.advance(self.tiles, n)

    def slide_done(self) -> None:
        self.progress.advance(self.slides, 1)


class SlideProcessor:
    """Runs the whole per-slide chain for one job and one pair of encoders."""

    def __init__(self, job: Path, config: PreprocessConfig, encoders: Encoders) -> None:
        self.job = Path(job)
        self.config = config
        self.encoders = encoders
        self.store = FeatureStore(self.job, encoders.folder)

    def output_paths(self, slide_id: str) -> dict[str, Path]:
        return {
            "features": self.store.path(slide_id),
            "tissue": self.job / "tissue" / f"{slide_id}.geojson",
            "qc": self.job / "qc" / f"{slide_id}.png",
        }

    def run(self, path: Path, slide_id: str, fp: dict[str, Any], progress: _Progress) -> jobs.SlideStatus:
        """Process one slide; never raises for a bad slide (the status says failed)."""
        outputs = self.output_paths(slide_id)
        status = jobs.SlideStatus(slide_id=slide_id, slide_path=str(path), status="running", encoder=self.encoders.tile.name)
        jobs.write_status(self.job, status)
        _remove_stale_partials(list(outputs.values()))
        try:
            n_regions, n_packs, n_patches = self._process(path, slide_id, fp, outputs, status.timings, progress)
        except Exception as exc:  # one bad slide must not stop the batch
            status.status = "failed"
            status.error = str(exc) if isinstance(exc, (RuntimeError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            for key in ("tissue", "qc"):
                if outputs[key].is_file():
                    setattr(status, key, str(outputs[key].relative_to(self.job)))
        else:
            status.status = "ok"
            status.n_patches, status.n_regions, status.n_packs = n_patches, n_regions, n_packs
            status.output = str(outputs["features"].relative_to(self.job))
            status.tissue = str(outputs["tissue"].relative_to(self.job))
            status.qc = str(outputs["qc"].relative_to(self.job))
            status.fingerprint = fp
        jobs.write_status(self.job, status)
        return status

    def _process(self, path: Path, slide_id: str, fp: dict[str, Any], outputs: dict[str, Path],
                 timings: dict[str, float], progress: _Progress) -> tuple[int, int, int]:
        cfg = self.config
        tile_enc = self.encoders.tile
        t0 = time.perf_counter()
        # The main process holds its own handle only for the overview, and closes it
        # before the workers start: they open theirs.
        with open_slide(path) as slide:
            mpp = resolve_mpp(slide, slide_id, cfg.mpp_override, cfg.mpp_table)
            slide_info = slide.describe()
            timings["open"] = time.perf_counter() - t0
            t = time.perf_counter()
            tissue, overview = segment_slide(slide, mpp.mpp, cfg.tissue)
            grid = SlideGrid(cfg.grid, slide.dimensions[0], slide.dimensions[1], mpp.mpp)
            patch_scale = grid.patch_step / cfg.grid.patch_px
            pack_scale = grid.pack_step / tile_enc.input_size
            patch_level = slide.best_level(patch_scale)
            pack_level = slide.best_level(pack_scale)
            downsamples = slide.level_downsamples
        fractions = tissue.patch_fractions(grid)
        keep = (fractions >= cfg.min_tissue) & (fractions > 0)
        rows, cols = np.nonzero(keep)  # row-major, the store's patch order
        patch_grid = np.stack([cols, rows], axis=1).astype(np.int64)
        polygons = mask_polygons(tissue)
        write_json_atomic(outputs["tissue"], tissue_geojson(tissue, slide_id), indent=None)
        qc = render_qc(overview, grid, patch_grid, polygons, max_side=cfg.qc_max_side)
        with atomic_path(outputs["qc"]) as tmp:
            qc.save(tmp, format="PNG")
        timings["tissue"] = time.perf_counter() - t
        if len(patch_grid) == 0:
            raise NoTissueError(
                f"{path}: no tissue found: none of {grid.n_cols * grid.n_rows} patches has >= {cfg.min_tissue:.0%} tissue "
                f"(saturation threshold {tissue.threshold:.0f}); look at {outputs['qc']}, then lower --min-tissue or set "
                "--saturation-threshold if tissue was missed"
            )

        t = time.perf_counter()
        hier = build_hierarchy(grid, patch_grid)
        patch_boxes = grid.patch_boxes(patch_grid)
        batches = make_batches("patch", patch_boxes, cfg.grid.patch_px, patch_level, cfg.batch_size)
        if cfg.pack_features:
            batches += make_batches("pack", hier.pack_boxes, tile_enc.input_size, pack_level, cfg.batch_size)
        n = len(patch_grid)
        targets = {"patch": np.empty((n, tile_enc.feature_dim), np.float32)}
        if cfg.pack_features:
            targets["pack"] = np.empty((len(hier.pack_grid), tile_enc.feature_dim), np.float32)
        progress.tiles_total(sum(len(b.boxes) for b in batches))
        dataset = BoxBatchDataset(path, batches, tile_enc.worker_transform)
        for item in iterate_batches(dataset, cfg.workers):
            if item["error"]:
                raise SlideReadError(f"{path}: reading {item['kind']} tiles failed ({item['error']})")
            encoded = to_numpy(tile_enc.encode(item["x"]))
            if encoded.shape != (item["n"], tile_enc.feature_dim):
                raise RuntimeError(f"encoder {tile_enc.name} returned {encoded.shape}, expected ({item['n']}, {tile_enc.feature_dim})")
            targets[item["kind"]][item["start"] : item["start"] + item["n"]] = encoded
            progress.tiles_done(item["n"])
        global_feature = None
        if cfg.global_feature:
            thumb = thumbnail_square(overview, tile_enc.input_size)
            global_feature = to_numpy(tile_enc.encode(tile_enc.worker_transform(thumb[None])))[0]
        timings["tiles"] = time.perf_counter() - t

        t = time.perf_counter()
        region_features = encode_regions(targets["patch"], hier, cfg.grid.region_patches, self.encoders.region)
        timings["regions"] = time.perf_counter() - t

        t = time.perf_counter()
        attrs = {
            "created": jobs.now_iso(),
            "slidevl_version": __version__,
            "config_fingerprint": fp,
            "encoder": tile_enc.name,
            "encoder_revision": tile_enc.revision,
            "encoder_provenance": tile_enc.provenance(),
            "input_size": int(tile_enc.input_size),
            "feature_dim": int(tile_enc.feature_dim),
            "region_encoder": self.encoders.region.name,
            "region_encoder_revision": self.encoders.region.revision,
            "region_feature_dim": int(region_features.shape[1]),
            "pack_feature_source": "tile encoder on the stitched pack image" if cfg.pack_features else None,
            "global_feature_source": "tile encoder on the white-padded square thumbnail" if cfg.global_feature else None,
            "target_mpp": cfg.grid.target_mpp,
            **mpp.as_attrs(),
            "read_level_patch": patch_level,
            "read_downsample_patch": downsamples[patch_level],
            "patch_resized": not math.isclose(downsamples[patch_level], patch_scale, rel_tol=1e-3),
            "read_level_pack": pack_level,
            "read_downsample_pack": downsamples[pack_level],
            "read_level_tissue": tissue.level,
            "patch_px": cfg.grid.patch_px,
            "patch_size_level0": float(grid.patch_step),
            "region_size_level0": float(grid.region_step),
            "pack_size_level0": float(grid.pack_step),
            "pack_size": cfg.grid.pack_size,
            "region_patches": cfg.grid.region_patches,
            "pack_image_px": int(tile_enc.input_size),
            "grid_spec": cfg.grid.as_dict(),
            "grid_shape": [grid.n_cols, grid.n_rows],
            "min_tissue": cfg.min_tissue,
            "segmentation": tissue.attrs(),
            "slide_path": slide_info["path"],
            "slide_file_bytes": slide_info["file_bytes"],
            "slide_width": slide_info["width"],
            "slide_height": slide_info["height"],
            "slide_vendor": slide_info["vendor"],
            "slide_backend": slide_info["backend"],
            "level_dimensions": slide_info["level_dimensions"],
            "level_downsamples": slide_info["level_downsamples"],
        }
        sf = SlideFeatures(
            slide_id=slide_id,
            patch_features=targets["patch"],
            patch_coords=patch_boxes[:, :2],
            patch_grid=patch_grid,
            patch_region=hier.region_index,
            patch_pack=hier.pack_index,
            patch_tissue=fractions[rows, cols].astype(np.float32),
            region_features=region_features,
            region_coords=hier.region_coords,
            region_grid=hier.region_grid,
            pack_features=targets.get("pack"),
            pack_coords=hier.pack_coords,
            pack_grid=hier.pack_grid,
            global_feature=global_feature,
            attrs=attrs,
        )
        self.store.write(sf, float16=cfg.float16)
        timings["write"] = time.perf_counter() - t
        return len(hier.region_grid), len(hier.pack_grid), n


def preprocess(slides: Path | str | Sequence[Path | str], out: Path | str, config: PreprocessConfig | None = None,
               *, encoders: Encoders | None = None, console: Console | None = None) -> JobReport:
    """Turn slides into feature files under ``out`` (see the module docstring).

    ``slides`` is a slide file, a folder of slides, or a list of either. Slides already
    complete for this configuration are skipped unless ``config.overwrite``. Raises
    :class:`slidevl.features.jobs.UsageError` when no slides are found; per-slide
    problems never raise, they are in the report, the status files and the manifest.
    ``encoders`` passes already-built encoder objects (e.g. a custom model following
    the encoder interface) instead of building ``config.encoder``/``config.region_encoder``.
    """
    config = config or PreprocessConfig()
    console = console or Console()
    job = Path(out)
    all_slides = jobs.discover_slides(slides)
    mine = jobs.shard_slides(all_slides, config.shard)
    encoders = encoders or load_encoders(config)
    processor = SlideProcessor(job, config, encoders)
    report = JobReport(job_dir=job, encoder=encoders.tile.name, feature_dir=processor.store.root)
    shard_note = f" (shard {config.shard[0]}/{config.shard[1]}: {len(mine)} of {len(all_slides)})" if config.shard else ""
    console.print(f"[bold]preprocess[/]: {len(mine)} slide(s){shard_note} -> {job} with encoder {encoders.tile.name}")
    with _Progress(console, config.progress, len(mine)) as progress:
        for path in mine:
            slide_id = jobs.slide_id_of(path)
            progress.start_slide(slide_id)
            started = time.perf_counter()
            fp = fingerprint(config, encoders, slide_id, path)
            feature_path = processor.store.path(slide_id)
            status = None if config.overwrite else jobs.complete_status(job, slide_id, feature_path, fp)
            if status is not None:
                status.action = "skipped"
                jobs.write_status(job, status)
                report.results.append(SlideResult(slide_id, path, "skipped", n_patches=status.n_patches, output=feature_path))
                progress.slide_done()
                continue
            status = processor.run(path, slide_id, fp, progress)
            seconds = time.perf_counter() - started
            if status.status == "ok":
                report.results.append(SlideResult(slide_id, path, "ok", n_patches=status.n_patches, output=feature_path, seconds=seconds))
            else:
                console.print(f"[red]failed[/] {slide_id}: {status.error}")
                report.results.append(SlideResult(slide_id, path, "failed", error=status.error, seconds=seconds))
            progress.slide_done()
    report.manifest, report.summary = jobs.rebuild_manifest(job, config.public_dict())
    return report
