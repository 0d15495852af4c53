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
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import imagecodecs
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slidevl import __version__
from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.errors import DataError
from slidevl.features import jobs
from slidevl.features.config import PreprocessConfig
from slidevl.features.slidepaths import SlideRecord
from slidevl.features.hierarchy import Hierarchy, build_hierarchy, encode_regions, to_numpy
from slidevl.features.store import SCHEMA_VERSION, FeatureStore, SlideFeatures
from slidevl.features.tiles import WorkItem, WorkItemDataset, iterate_items, mosaic_items, pack_items, patch_items
from slidevl.slide.geojson import mask_polygons, polygons_geojson
from slidevl.slide.mpp import MppInfo, mpp_request, resolve_mpp
from slidevl.slide.qc import render_qc
from slidevl.slide.formats import slide_bytes
from slidevl.slide.reader import SlideReadError, open_slide, resize_image
from slidevl.slide.tissue import TissueMask, segment_slide
from slidevl.tiling.grid import SlideGrid

if TYPE_CHECKING:
    from slidevl.features.executors import Executor


class NoTissueError(DataError):
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
    # The specs they were built from (None for encoder objects passed in directly).
    tile_spec: str | None = None
    region_spec: str | None = None

    @property
    def folder(self) -> str:
        from slidevl.features.encoders.base import safe_name

        return safe_name(self.tile.name)

    @property
    def precision(self) -> str | None:
        """The tile encoder's forward-pass precision (``fp32``/``bf16``); None without a network."""
        from slidevl.features.encoders.base import NetworkTileEncoder

        return self.tile.compute_precision if isinstance(self.tile, NetworkTileEncoder) else None

    @property
    def on_cuda(self) -> bool:
        device = getattr(self.tile, "device", None)
        return device is not None and torch.device(device).type == "cuda"

    def describe(self) -> dict[str, Any]:
        described = {
            "encoder": self.tile.name,
            "encoder_revision": self.tile.revision,
            "input_size": int(self.tile.input_size),
            "feature_dim": int(self.tile.feature_dim),
            "region_encoder": self.region.name,
            "region_encoder_revision": self.region.revision,
        }
        # Only network encoders have a precision; leaving the key out for the others
        # keeps their existing jobs' fingerprints, so they are not recomputed.
        if self.precision is not None:
            described["precision"] = self.precision
        return described


def load_encoders(config: PreprocessConfig) -> Encoders:
    """Instantiate the configured tile and region encoders."""
    from slidevl.features.encoders import get_encoder, get_region_encoder
    from slidevl.features.encoders.base import NetworkTileEncoder

    tile = get_encoder(config.encoder, device=config.device)
    if isinstance(tile, NetworkTileEncoder):  # the others compute in numpy: precision does not apply
        tile.set_precision(config.precision)
    return Encoders(
        tile=tile,
        region=get_region_encoder(config.region_encoder, device=config.device),
        tile_spec=config.encoder,
        region_spec=config.region_encoder,
    )


def fingerprint(config: PreprocessConfig, encoders: Encoders, slide_id: str, slide_path: Path) -> dict[str, Any]:
    """Everything that decides a slide's feature file; a change re-runs the slide."""
    return jobs.normalise(
        {
            "schema_version": SCHEMA_VERSION,
            **encoders.describe(),
            "grid": config.grid.to_dict(),
            "tissue": config.tissue.to_dict(),
            "min_tissue": config.min_tissue,
            "mpp": mpp_request(slide_id, config.mpp_override, config.mpp_table),
            "pack_features": config.pack_features,
            "global_feature": config.global_feature,
            "float16": config.float16,
            "slide_bytes": slide_bytes(slide_path) if slide_path.exists() else None,
        }
    )


def remove_stale_partials(paths: Sequence[Path]) -> None:
    """Delete the atomic-write temporaries of ``paths`` left by a killed process.

    A SIGKILL skips atomic_path's cleanup; the temporaries of this slide are garbage.
    """
    for target in paths:
        for stale in glob.glob(str(target.parent / f".{glob.escape(target.name)}.*.partial")):
            Path(stale).unlink(missing_ok=True)


def thumbnail_square(overview: np.ndarray, size: int) -> np.ndarray:
    """Whole-slide overview padded to a square with white (centred), ``size`` px a side.

    Shrinks first and pads after, so no full-resolution square canvas is allocated.
    """
    h, w = overview.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = resize_image(Image.fromarray(overview), (new_w, new_h))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


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
        self.tiles = self.progress.add_task("patches", total=0)

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start_slide(self, slide_id: str) -> None:
        self.progress.update(self.slides, description=f"slides ({slide_id})")
        self.progress.reset(self.tiles, total=0, description="patches")

    def tiles_total(self, total: int) -> None:
        self.progress.reset(self.tiles, total=total, description="patches")

    def tiles_done(self, n: int) -> None:
        self.progress.advance(self.tiles, n)

    def slide_done(self) -> None:
        self.progress.advance(self.slides, 1)


@dataclass
class _Layout:
    """What segmentation and the grid decided for one slide."""

    mpp: MppInfo
    slide_info: dict[str, Any]
    tissue: TissueMask
    overview: np.ndarray
    grid: SlideGrid
    patch_grid: np.ndarray  # (N, 2) kept patches, row-major
    patch_tissue: np.ndarray  # (N,) their tissue fractions
    patch_level: int
    pack_level: int
    patch_scale: float  # level-0 px per patch px

    def use_mosaic(self, pack_features: bool) -> bool:
        # Pack images from the patch level are exactly the mosaics of their patch tiles.
        return pack_features and self.pack_level == self.patch_level


def output_paths(job: Path, store: FeatureStore, slide_id: str) -> dict[str, Path]:
    """The files one slide writes besides its status.

    The tissue outline and the QC picture go to the encoder folder's own place: two
    encoders of one job may have been run with other tissue or grid settings, and each
    status must name the outline its features were made from.
    """
    return {
        "features": store.path(slide_id),
        "tissue": job / "tissue" / store.encoder / f"{slide_id}.geojson",
        "qc": job / "qc" / store.encoder / f"{slide_id}.png",
    }


class SlideProcessor:
    """Runs the whole per-slide chain for one job and one pair of encoders."""

    def __init__(self, job: Path, config: PreprocessConfig, encoders: Encoders) -> None:
        self.job = Path(job)
        self.config = config
        self.encoders = encoders
        self.store = FeatureStore(self.job, encoders.folder)

    def output_paths(self, slide_id: str) -> dict[str, Path]:
        return output_paths(self.job, self.store, slide_id)

    def run(self, path: Path, slide_id: str, fp: dict[str, Any], progress: _Progress) -> jobs.SlideStatus:
        """Process one slide; never raises for a bad slide (the status says failed)."""
        outputs = self.output_paths(slide_id)
        status = jobs.SlideStatus(slide_id=slide_id, **SlideRecord.of_file(slide_id, path, self.job).fields(), status="running",
                                  encoder=self.encoders.tile.name, encoder_folder=self.store.encoder)
        remove_stale_partials([*outputs.values(), jobs.status_path(self.job, slide_id, self.store.encoder)])
        jobs.write_status(self.job, status)
        try:
            n_regions, n_packs, n_patches = self._process(path, slide_id, fp, outputs, status.timings, progress)
        except KeyboardInterrupt:
            # Ctrl-C/SIGTERM (see slidevl.interrupts): record the slide as interrupted, not
            # "running", so the job and its manifest tell the truth; the rerun redoes it.
            status.status = "interrupted"
            status.error = "interrupted before it finished; rerun the same command to resume"
            jobs.write_status(self.job, status)
            raise
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
        layout = self._layout(path, slide_id, outputs, timings)
        hier = build_hierarchy(layout.grid, layout.patch_grid)
        features = self._encode_tiles(path, layout, hier, progress, timings)
        t = time.perf_counter()
        region_features = encode_regions(features["patch"], hier, self.config.grid.region_patches, self.encoders.region)
        timings["regions"] = time.perf_counter() - t
        t = time.perf_counter()
        sf = SlideFeatures(
            slide_id=slide_id,
            patch_features=features["patch"],
            patch_coords=layout.grid.patch_boxes(layout.patch_grid)[:, :2],
            patch_grid=layout.patch_grid,
            patch_region=hier.region_index,
            patch_pack=hier.pack_index,
            patch_tissue=layout.patch_tissue,
            region_features=region_features,
            region_coords=hier.region_coords,
            region_grid=hier.region_grid,
            pack_features=features.get("pack"),
            pack_coords=hier.pack_coords,
            pack_grid=hier.pack_grid,
            global_feature=features.get("global"),
            attrs=self._attrs(layout, fp, region_features.shape[1]),
        )
        self.store.write(sf, float16=self.config.float16)
        timings["write"] = time.perf_counter() - t
        return len(hier.region_grid), len(hier.pack_grid), len(layout.patch_grid)

    def _layout(self, path: Path, slide_id: str, outputs: dict[str, Path], timings: dict[str, float]) -> _Layout:
        """Open, resolve the mpp, segment, lay the grid, keep patches; write GeoJSON and QC.

        ``timings`` gets ``open``, ``tissue`` (segmentation), ``tiling`` (grid, levels and
        kept patches) and ``qc`` (the GeoJSON outline and the QC picture).
        """
        cfg = self.config
        t = time.perf_counter()
        # The main process holds its own handle only for the overview, and closes it
        # before the workers start: they open theirs.
        with open_slide(path) as slide:
            mpp = resolve_mpp(slide, slide_id, cfg.mpp_override, cfg.mpp_table)
            slide_info = slide.describe()
            timings["open"] = time.perf_counter() - t
            t = time.perf_counter()
            tissue, overview = segment_slide(slide, mpp.mpp, cfg.tissue)
            timings["tissue"] = time.perf_counter() - t
            t = time.perf_counter()
            grid = SlideGrid(cfg.grid, slide.dimensions[0], slide.dimensions[1], mpp.mpp)
            patch_scale = grid.patch_step / cfg.grid.patch_px
            patch_level = slide.best_level(patch_scale)
            pack_level = slide.best_level(grid.pack_step / self.encoders.tile.input_size)
        fractions = tissue.patch_fractions(grid)
        rows, cols = np.nonzero((fractions >= cfg.min_tissue) & (fractions > 0))  # row-major: the store's order
        layout = _Layout(
            mpp=mpp, slide_info=slide_info, tissue=tissue, overview=overview, grid=grid,
            patch_grid=np.stack([cols, rows], axis=1).astype(np.int64),
            patch_tissue=fractions[rows, cols].astype(np.float32),
            patch_level=patch_level, pack_level=pack_level, patch_scale=patch_scale,
        )
        timings["tiling"] = time.perf_counter() - t
        t = time.perf_counter()
        polygons = mask_polygons(tissue)
        write_json_atomic(outputs["tissue"], polygons_geojson(polygons, slide_id), indent=None)
        qc = render_qc(overview, grid, layout.patch_grid, polygons, max_side=cfg.qc_max_side)
        with atomic_path(outputs["qc"]) as tmp:
            # Fastest zlib level (a QC picture is looked at, not archived) and one row filter:
            # libpng so writes the picture in a third of the time PIL takes (which tries every
            # filter on every row), at the same size.
            tmp.write_bytes(imagecodecs.png_encode(np.asarray(qc), level=1, filter=imagecodecs.PNG.FILTER.UP))
        timings["qc"] = time.perf_counter() - t
        if len(layout.patch_grid) == 0:
            raise NoTissueError(
                f"{path}: no tissue found: none of {grid.n_cols * grid.n_rows} patches has >= {cfg.min_tissue:.0%} tissue "
                f"(saturation threshold {tissue.threshold:.0f}); look at {outputs['qc']}, then lower --min-tissue or set "
                "--saturation-threshold if tissue was missed"
            )
        return layout

    def _work_items(self, layout: _Layout, hier: Hierarchy) -> list[WorkItem]:
        """Patch batches and pack batches, or pack mosaics that cover both at once."""
        cfg = self.config
        input_size = self.encoders.tile.input_size
        grid = layout.grid
        if not layout.use_mosaic(cfg.pack_features):
            patch_boxes = grid.patch_boxes(layout.patch_grid)
            rows = np.arange(len(patch_boxes))
            items = patch_items(patch_boxes, rows, cfg.grid.patch_px, layout.patch_level, cfg.batch_size)
            if cfg.pack_features:
                items += pack_items(hier.pack_boxes, input_size, layout.pack_level, cfg.batch_size)
            return items
        k = cfg.grid.pack_size
        offsets = np.stack(np.meshgrid(np.arange(k), np.arange(k)), axis=-1).reshape(-1, 2)  # row-major (col, row)
        cells = (hier.pack_grid[:, None, :] * k + offsets[None]).reshape(-1, 2)
        cell_boxes = grid.patch_boxes(cells).reshape(len(hier.pack_grid), k * k, 4)
        # Which kept patch (row) sits in each cell: slot = position inside the pack.
        cell_rows = np.full((len(hier.pack_grid), k * k), -1, dtype=np.int64)
        cell_rows[hier.pack_index, grid.pack_slot(hier.patch_grid)] = np.arange(len(hier.patch_grid))
        return mosaic_items(cell_boxes, cell_rows, cfg.grid.patch_px, input_size, layout.patch_level, cfg.batch_size)

    def _encode_tiles(self, path: Path, layout: _Layout, hier: Hierarchy, progress: _Progress,
                      timings: dict[str, float]) -> dict[str, np.ndarray]:
        """Patch and pack features streamed from the workers, plus the thumbnail feature.

        The workers read (and run the encoder's ``worker_transform``) while this process
        encodes, so ``timings`` gets the two parts of this process's time: ``read``, waiting
        for the workers' next item (their start included), which is reading that encoding did
        not hide; ``encode``, everything else (encoding, the thumbnail, progress).
        """
        enc = self.encoders.tile
        start = time.perf_counter()
        out = {"patch": np.empty((len(layout.patch_grid), enc.feature_dim), np.float32)}
        if self.config.pack_features:
            out["pack"] = np.empty((len(hier.pack_grid), enc.feature_dim), np.float32)
        progress.tiles_total(len(layout.patch_grid))
        dataset = WorkItemDataset(path, self._work_items(layout, hier), enc.worker_transform)
        waited = 0.0
        # closing(): a failure stops the workers at once, not when the generator is collected.
        with closing(iterate_items(dataset, self.config.workers, pin_memory=self.encoders.on_cuda)) as items:
            while True:
                t = time.perf_counter()
                result = next(items, None)
                waited += time.perf_counter() - t
                if result is None:
                    break
                if result["error"]:
                    raise SlideReadError(result["error"])
                for kind in ("patch", "pack"):
                    if result[kind] is not None:
                        rows, transformed = result[kind]
                        out[kind][rows] = self._checked(enc.encode(transformed), len(rows))
                progress.tiles_done(result["n_patches"])
        if self.config.global_feature:
            thumb = thumbnail_square(layout.overview, enc.input_size)
            out["global"] = self._checked(enc.encode(enc.worker_transform(thumb[None])), 1)[0]
        timings["read"] = waited
        timings["encode"] = time.perf_counter() - start - waited
        return out

    def _checked(self, encoded: Any, n: int) -> np.ndarray:
        enc = self.encoders.tile
        array = to_numpy(encoded)
        if array.shape != (n, enc.feature_dim):
            raise RuntimeError(f"encoder {enc.name} returned features of shape {array.shape}, expected ({n}, {enc.feature_dim})")
        return array

    def _attrs(self, layout: _Layout, fp: dict[str, Any], region_dim: int) -> dict[str, Any]:
        """Provenance attributes of the feature file."""
        cfg, enc, region = self.config, self.encoders.tile, self.encoders.region
        grid, info, downsamples = layout.grid, layout.slide_info, layout.slide_info["level_downsamples"]
        if not cfg.pack_features:
            pack_source = None
        elif layout.use_mosaic(cfg.pack_features):
            pack_source = "tile encoder on the mosaic of the pack's patch tiles, shrunk to the input size"
        else:
            pack_source = "tile encoder on the pack box read at the pack level, resized to the input size"
        return {
            "created": jobs.now_iso(),
            "slidevl_version": __version__,
            "config_fingerprint": fp,
            "encoder": enc.name,
            "encoder_spec": self.encoders.tile_spec,
            "encoder_revision": enc.revision,
            "encoder_provenance": enc.provenance(),
            "encoder_precision": self.encoders.precision,
            "input_size": int(enc.input_size),
            "feature_dim": int(enc.feature_dim),
            "region_encoder": region.name,
            "region_encoder_spec": self.encoders.region_spec,
            "region_encoder_revision": region.revision,
            "region_encoder_provenance": region.provenance(),
            "region_feature_dim": int(region_dim),
            "pack_feature_source": pack_source,
            "global_feature_source": "tile encoder on the white-padded square thumbnail" if cfg.global_feature else None,
            "target_mpp": cfg.grid.target_mpp,
            **layout.mpp.as_attrs(),
            "read_level_patch": layout.patch_level,
            "read_downsample_patch": downsamples[layout.patch_level],
            "patch_resized": not math.isclose(downsamples[layout.patch_level], layout.patch_scale, rel_tol=1e-3),
            "read_level_pack": layout.pack_level,
            "read_downsample_pack": downsamples[layout.pack_level],
            "read_level_tissue": layout.tissue.level,
            "patch_px": cfg.grid.patch_px,
            "patch_size_level0": float(grid.patch_step),
            "region_size_level0": float(grid.region_step),
            "pack_size_level0": float(grid.pack_step),
            "pack_size": cfg.grid.pack_size,
            "region_patches": cfg.grid.region_patches,
            "pack_image_px": int(enc.input_size),
            "grid_spec": cfg.grid.to_dict(),
            "grid_shape": [grid.n_cols, grid.n_rows],
            "min_tissue": cfg.min_tissue,
            "segmentation": layout.tissue.attrs(),
            "slide_path": info["path"],
            "slide_file_bytes": info["file_bytes"],
            "slide_width": info["width"],
            "slide_height": info["height"],
            "slide_vendor": info["vendor"],
            "slide_backend": info["backend"],
            "level_dimensions": info["level_dimensions"],
            "level_downsamples": downsamples,
        }


def run_slide(processor: SlideProcessor, path: Path, progress: _Progress) -> SlideResult:
    """Skip ``path`` when it is complete for this configuration, else process it.

    The one per-slide step of every executor (see :mod:`slidevl.features.executors`):
    the local loop and a Ray task both call it, so a slide's files and status are the
    same whichever ran it. Never raises for a bad slide.
    """
    job, config = processor.job, processor.config
    slide_id = jobs.slide_id_of(path)
    started = time.perf_counter()
    fp = fingerprint(config, processor.encoders, slide_id, path)
    feature_path = processor.store.path(slide_id)
    status = None if config.overwrite else jobs.complete_status(job, slide_id, feature_path, fp, path)
    if status is not None:
        # The slide may have moved since it was processed: record where it is now.
        status = replace(status, action="skipped", **SlideRecord.of_file(slide_id, path, job).fields())
        jobs.write_status(job, status)
        return SlideResult(slide_id, path, "skipped", n_patches=status.n_patches, output=feature_path)
    status = processor.run(path, slide_id, fp, progress)
    seconds = time.perf_counter() - started
    if status.status == "ok":
        return SlideResult(slide_id, path, "ok", n_patches=status.n_patches, output=feature_path, seconds=seconds)
    return SlideResult(slide_id, path, "failed", error=status.error, seconds=seconds)


def preprocess(slides: Path | str | Sequence[Path | str], out: Path | str, config: PreprocessConfig | None = None,
               *, encoders: Encoders | None = None, console: Console | None = None,
               executor: Executor | None = None) -> JobReport:
    """Turn slides into feature files under ``out`` (see the module docstring).

    ``slides`` is a slide file, a DICOM series folder, a folder of slides, or a list of
    them (see :func:`slidevl.features.jobs.scan_folder`); entries of the folders that are
    not slides are printed and listed in the job summary. Slides already
    complete for this configuration are skipped unless ``config.overwrite``. Raises
    :class:`slidevl.features.jobs.UsageError` when no slides are found; per-slide
    problems never raise, they are in the report, the status files and the manifest.
    ``encoders`` passes already-built encoder objects (e.g. a custom model following
    the encoder interface) instead of building ``config.encoder``/``config.region_encoder``.
    ``executor`` runs the slides (default: one after another in this process; see
    :mod:`slidevl.features.executors` for Ray).
    """
    # executors builds on this module, so it is imported here rather than at the top.
    from slidevl.features.encoders.base import safe_name
    from slidevl.features.executors import LocalExecutor

    config = config or PreprocessConfig()
    console = console or Console()
    job = Path(out)
    all_slides, not_slides = jobs.find_inputs(slides)
    mine = jobs.shard_slides(all_slides, config.shard)
    executor = executor or LocalExecutor()
    try:
        encoder_name = executor.start(job, config, encoders)
        folder = safe_name(encoder_name)
        report = JobReport(job_dir=job, encoder=encoder_name, feature_dir=FeatureStore(job, folder).root)
        shard_note = f" (shard {config.shard[0]}/{config.shard[1]}: {len(mine)} of {len(all_slides)})" if config.shard else ""
        console.print(f"[bold]preprocess[/]: {len(mine)} slide(s){shard_note} -> {job} with encoder {encoder_name}"
                      f"{executor.note}")
        note = jobs.not_slides_note(not_slides)
        if note:
            console.print(f"{note} (listed in {job / jobs.SUMMARY})", highlight=False)
        try:
            # closing(): an interrupt here ends the executor's run at once (cancelling what it started).
            with _Progress(console, config.progress, len(mine)) as progress, closing(executor.run(mine, progress)) as results:
                for result in results:
                    if result.status == "failed":
                        console.print(f"[red]failed[/] {result.slide_id}: {result.error}")
                    report.results.append(result)
                    progress.slide_done()
        finally:
            # Also after an interrupt or a crash: the manifest always reflects every status file.
            report.manifest, report.summary = jobs.rebuild_manifest(job, config.manifest_dict(), not_slides, folder)
    finally:
        executor.close()
    return report
