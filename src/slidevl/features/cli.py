"""Command line: ``slidevl preprocess`` and ``slidevl features import``.

Exit codes: 0 = every slide ok or skipped, 1 = some slides failed (the rest completed;
see the manifest), 2 = usage error (bad option, no slides found, unreadable mpp CSV).

The top-level CLI mounts :func:`preprocess_command` as ``preprocess`` and
:data:`features_app` as ``features``; :data:`app` bundles both for direct use.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from slidevl.cli_config import field_option, options_from
from slidevl.cli_errors import ReportingCommand, ReportingGroup
from slidevl.errors import EXIT_FAILED
from slidevl.features.encoders.presets import default_mpp
from slidevl.features.config import PreprocessConfig, parse_shard, slurm_array_shard
from slidevl.features.jobs import MANIFEST, UsageError, read_manifest, recorded_slides
from slidevl.interrupts import resumable
from slidevl.slide.mpp import load_mpp_csv
from slidevl.slide.tissue import TissueParams
from slidevl.tiling.grid import GridSpec

app = typer.Typer(cls=ReportingGroup, help="Slides to multi-scale features.", no_args_is_help=True, add_completion=False)
features_app = typer.Typer(cls=ReportingGroup, help="Feature store utilities (import features made by other tools).",
                           no_args_is_help=True)


@options_from(TissueParams, recipe_help="YAML/JSON file of tissue settings (TissueParams fields); the tissue "
                                       "options given here override it.")
def preprocess_command(
    tissue: TissueParams,
    slides: Optional[List[Path]] = typer.Argument(
        None, help="Slide files, DICOM series folders and/or folders of slides (docs/slides.md); omitted: the slides the job --out already records."),
    out: Path = typer.Option(..., "--out", "-o", help="Job folder (created if needed; shards may share it)."),
    slides_root: Optional[Path] = typer.Option(
        None, "--slides-root", help="Re-running a job's recorded slides: the folder that now holds them."),
    encoder: str = field_option(PreprocessConfig, "encoder"),
    region_encoder: str = field_option(PreprocessConfig, "region_encoder"),
    device: str = field_option(PreprocessConfig, "device"),
    precision: str = field_option(PreprocessConfig, "precision"),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Target microns per pixel of patches (default: the encoder preset's training mpp, else 0.5 = 20x)."),
    magnification: Optional[float] = typer.Option(None, help="Alias for --mpp: 20 means 0.5 µm/px (mpp = 10 / mag)."),
    patch_px: int = field_option(GridSpec, "patch_px"),
    region_patches: int = field_option(GridSpec, "region_patches"),
    pack_size: int = field_option(GridSpec, "pack_size"),
    min_tissue: float = field_option(PreprocessConfig, "min_tissue"),
    mpp_override: Optional[float] = field_option(PreprocessConfig, "mpp_override"),
    mpp_csv: Optional[Path] = typer.Option(None, help="CSV with columns slide_id,mpp: per-slide mpp (wins over the rest)."),
    pack_features: bool = field_option(PreprocessConfig, "pack_features"),
    global_feature: bool = field_option(PreprocessConfig, "global_feature"),
    float32: bool = typer.Option(False, "--float32", help="Store features as float32 (default float16)."),
    batch_size: int = field_option(PreprocessConfig, "batch_size"),
    workers: int = field_option(PreprocessConfig, "workers"),
    shard: Optional[str] = typer.Option(
        None, help="Process shard i of n (0-based), e.g. 0/4: every n-th slide by sorted id. Inside a Slurm array "
                   "job the shard comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when this is not given."),
    overwrite: bool = field_option(PreprocessConfig, "overwrite", "--overwrite"),
    executor: str = typer.Option(
        "local", help="local: slides one after another on this machine. ray: each slide a Ray task (one GPU each "
                      "with --device cuda), on the cluster at --address or on a local Ray cluster; see docs/cluster.md."),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster to run on with --executor ray (head:6379, ray://head:10001 or auto); default: a local one."),
    progress: bool = field_option(PreprocessConfig, "progress"),
) -> None:
    """Segment tissue, tile on the global grid and encode patches, regions, packs and thumbnail.

    Re-running the same command skips slides that are complete for the same settings;
    without SLIDES it re-runs the slides the job records (moved ones found with --slides-root).
    Exit codes: 0 all slides ok or skipped, 1 some slides failed, 2 usage error.
    """
    from slidevl.features.executors import make_executor
    from slidevl.features.pipeline import preprocess

    console = Console()
    if mpp is not None and magnification is not None:
        raise UsageError("give --mpp or --magnification, not both")
    target_mpp = 10.0 / magnification if magnification else (mpp if mpp is not None else default_mpp(encoder))
    array_shard = None if shard else slurm_array_shard()
    if array_shard is not None:
        console.print(f"Slurm array task: shard {array_shard[0]}/{array_shard[1]} of the batch (from SLURM_ARRAY_TASK_ID)")
    config = PreprocessConfig(
        grid=GridSpec(target_mpp=target_mpp, patch_px=patch_px, region_patches=region_patches, pack_size=pack_size),
        tissue=tissue,
        min_tissue=min_tissue,
        encoder=encoder,
        region_encoder=region_encoder,
        device=device,
        precision=precision,
        mpp_override=mpp_override,
        mpp_table=load_mpp_csv(mpp_csv) if mpp_csv else None,
        pack_features=pack_features,
        global_feature=global_feature,
        float16=not float32,
        batch_size=batch_size,
        workers=workers,
        shard=parse_shard(shard) if shard else array_shard,
        overwrite=overwrite,
        progress=progress,
    )
    if slides and slides_root is not None:
        raise UsageError("--slides-root applies when re-running the slides the job records; give SLIDES or --slides-root, not both")
    runner = make_executor(executor, address)
    with resumable(lambda: _finished(out), console=console):
        report = preprocess(slides or recorded_slides(out, slides_root), out, config, console=console, executor=runner)
    console.print(
        f"[bold]done[/]: {report.n_ok} ok, {report.n_skipped} skipped (already complete), {report.n_failed} failed"
    )
    console.print(f"  features: {report.feature_dir}")
    console.print(f"  tissue:   {report.job_dir / 'tissue' / report.feature_dir.name}  (QuPath GeoJSON)")
    console.print(f"  qc:       {report.job_dir / 'qc' / report.feature_dir.name}")
    console.print(f"  manifest: {report.manifest}")
    console.print(f"  summary:  {report.summary}")
    if report.exit_code:
        console.print(f"[red]{report.n_failed} slide(s) failed[/]; see {report.summary}")
        raise typer.Exit(report.exit_code)


def _finished(job: Path) -> str:
    """What an interrupted preprocess leaves done, from the manifest its ``finally`` rebuilt."""
    manifest = read_manifest(job)
    if manifest is None:
        return f"no slide finished in {job}"
    # Only the interrupted run's encoder: other encoders' rows in the same job are not its work.
    latest = manifest.get("latest_encoder")
    counts = Counter(row["status"] for row in manifest["slides"] if latest is None or row.get("encoder_folder") == latest)
    done = [f"{counts.get('ok', 0) + counts.get('skipped', 0)} slide(s) complete"]
    done += [f"{counts[key]} {key}" for key in ("failed", "interrupted") if counts.get(key)]
    return f"{', '.join(done)} ({job / MANIFEST})"


class ImportFormat(str, Enum):
    clam = "clam"
    trident = "trident"


@features_app.command("import", cls=ReportingCommand)
def import_command(
    src: List[Path] = typer.Argument(..., help="CLAM/TRIDENT .h5 files or folders of them."),
    fmt: ImportFormat = typer.Option(..., "--format", help="Which tool wrote the files."),
    out: Path = typer.Option(..., "--out", "-o", help="Job folder to import into."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Level-0 microns per pixel of the source slides."),
    mpp_csv: Optional[Path] = typer.Option(None, help="CSV slide_id,mpp (per slide; wins over --mpp)."),
    patch_size_level0: Optional[float] = typer.Option(None, help="Patch edge in level-0 px (when the attrs lack it)."),
    patch_px: Optional[int] = typer.Option(None, help="Patch edge in px at extraction (when the attrs lack patch_size)."),
    encoder: Optional[str] = typer.Option(
        None, help="Encoder name for the store folder (default: from a features_<name>/ parent folder, else the format)."
    ),
    region_encoder: str = typer.Option("mean", help="Region pooling over the 16x16 patch grid."),
    float32: bool = typer.Option(False, "--float32", help="Store features as float32 (default float16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace slides already imported."),
) -> None:
    """Import patch features made by CLAM or TRIDENT (root-level 'features' + 'coords')."""
    from slidevl.features.importer import import_features

    console = Console()
    if mpp is None and mpp_csv is None:
        raise UsageError("the source files record no mpp; pass --mpp (or --mpp-csv with columns slide_id,mpp)")
    if mpp is not None and not mpp > 0:
        raise UsageError(f"--mpp must be > 0, got {mpp}")
    results = import_features(
        src, out, fmt.value, mpp=mpp, mpp_table=load_mpp_csv(mpp_csv) if mpp_csv else None,
        patch_size_level0=patch_size_level0, patch_px=patch_px, encoder=encoder,
        region_encoder=region_encoder, float16=not float32, overwrite=overwrite,
    )
    failed = 0
    for r in results:
        if r.status == "ok":
            console.print(f"[green]ok[/] {r.slide_id}: {r.n_patches} patches -> {r.output}")
        elif r.status == "skipped":
            console.print(f"[yellow]skipped[/] {r.slide_id}: {r.error}")
        else:
            failed += 1
            console.print(f"[red]failed[/] {r.slide_id}: {r.error}")
    if failed:
        raise typer.Exit(EXIT_FAILED)


app.command("preprocess")(preprocess_command)
app.add_typer(features_app, name="features")
