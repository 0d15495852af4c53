"""``slidevl synth``: command-line front end of :mod:`slidevl.synth.cohort`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..cli_errors import ReportingGroup
from .cohort import make_cohort

app = typer.Typer(cls=ReportingGroup, help="Synthetic H&E-like cohorts with planted ground truth.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Synthetic H&E-like cohorts with planted ground truth."""


@app.command()
def cohort(
    out: Path = typer.Argument(..., help="Output folder (slides/, labels/, clinical.csv, splits/, truth.json)."),
    patients: int = typer.Option(8, "--patients", "-n", min=2, help="Number of patients."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    slide_px: int = typer.Option(
        4096, "--slide-px", min=512, help="Level-0 width of each slide in pixels (0.5 µm/px)."
    ),
    censor_rate: float = typer.Option(0.65, "--censor-rate", min=0.01, max=0.99, help="Expected censored fraction."),
    two_slide_fraction: float = typer.Option(
        0.2, "--two-slide-fraction", min=0.0, max=1.0, help="Patients with two slides."
    ),
    generic_fraction: float = typer.Option(
        0.1, "--generic-fraction", min=0.0, max=1.0, help="Slides written as generic TIFF (at least one)."
    ),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of cross-validation folds."),
    texture_px: int = typer.Option(2048, "--texture-px", min=256, help="Edge of the periodic texture banks."),
    quality: int = typer.Option(90, "--quality", min=50, max=100, help="JPEG quality of the tiles."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cohort already in OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Render a synthetic cohort of pyramidal TIFF slides with survival labels and truth."""
    console = Console(stderr=True)
    info = make_cohort(
        out,
        n_patients=patients,
        seed=seed,
        slide_px=slide_px,
        censor_rate=censor_rate,
        two_slide_fraction=two_slide_fraction,
        generic_fraction=generic_fraction,
        n_folds=folds,
        texture_px=texture_px,
        quality=quality,
        overwrite=overwrite,
        progress=not quiet,
    )
    c = "n/a" if info.oracle_c_index is None else f"{info.oracle_c_index:.3f}"
    console.print(
        f"wrote {info.n_slides} slides of {info.n_patients} patients to {info.out_dir} "
        f"({info.megapixels:.0f} Mpx in {info.seconds:.1f} s, {info.megapixels / max(info.seconds, 1e-9):.1f} Mpx/s); "
        f"generic TIFF: {', '.join(info.generic_slide_ids)}; oracle C-index {c}"
    )
