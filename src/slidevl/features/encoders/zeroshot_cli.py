"""``slidevl encoders zero-shot``: a zero-shot patch classification map from text prompts.

The command is a plain function, registered by :mod:`slidevl.features.encoders.cli`;
the work is :func:`slidevl.features.zeroshot.zero_shot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console


def zero_shot_command(
    inputs: List[Path] = typer.Argument(..., help="A job folder (with manifest.json), or slide files / folders of slides."),
    encoder: str = typer.Option(..., "--encoder", help="Vision-language encoder: conch:/path/to/CONCH or openclip:DIR|ARCH@CKPT."),
    prompts: Path = typer.Option(..., "--prompts", help="JSON, TOML or YAML mapping class name -> prompt text(s)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Job input: results folder (default JOB/zeroshot/<prompts name>). Slide input: the job folder to create "
             "(results in OUT/zeroshot/<prompts name>).",
    ),
    device: str = typer.Option("cpu", help="Device for the model (cpu, cuda, cuda:1, ...)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Slide input: patch mpp (default: the encoder's training mpp)."),
    patch_px: int = typer.Option(256, help="Slide input: patch edge in pixels at the target mpp."),
    min_tissue: float = typer.Option(0.25, help="Slide input: keep patches with at least this tissue fraction."),
    workers: Optional[int] = typer.Option(None, help="Slide input: tile-reading worker processes (default: per CPU)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Classify every tissue patch by its closest class prompts (CONCH's zero-shot rule) and write a viewer overlay."""
    from slidevl.errors import InputError
    from slidevl.features.config import PreprocessConfig, default_workers
    from slidevl.features.encoders.presets import default_mpp
    from slidevl.features.zeroshot import is_job, zero_shot
    from slidevl.tiling.grid import GridSpec

    console = Console(stderr=True)
    if len(inputs) > 1 and any(is_job(p) for p in inputs):
        raise InputError("pass one job folder, or slides only")
    config = PreprocessConfig(
        grid=GridSpec(target_mpp=mpp if mpp is not None else default_mpp(encoder), patch_px=patch_px),
        min_tissue=min_tissue, device=device, workers=default_workers() if workers is None else workers,
        progress=not quiet,
    )
    report = zero_shot(inputs, encoder, prompts, out, device=device, config=config, console=console,
                       progress=not quiet)
    for slide_id, counts in report.slides.items():
        top = max(counts, key=counts.get)
        typer.echo(f"{slide_id}: {sum(counts.values())} patches, most often {top!r} ({counts[top]})")
    typer.echo(f"results: {report.results}")
    typer.echo(f"view: {report.serve_command()}")
