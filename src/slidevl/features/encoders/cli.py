"""``slidevl encoders ...``: list the encoder specs and describe one encoder.

The lead registers :data:`app` under the top-level CLI; each command is also a plain
function of this package (:func:`available_encoders`, :func:`get_encoder`).
"""

from __future__ import annotations

import json

import typer

from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.region import available_region_encoders, get_region_encoder
from slidevl.features.encoders.registry import DEFAULT_ENCODER, available_encoders, get_encoder

app = typer.Typer(help="Tile and region encoders: list the specs, inspect one.", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """Print the tile and region encoder spec forms."""
    typer.echo("tile encoders:")
    for spec in available_encoders():
        typer.echo(f"  {spec}{'  (default)' if spec == DEFAULT_ENCODER else ''}")
    typer.echo("region encoders:")
    for spec in available_region_encoders():
        typer.echo(f"  {spec}{'  (default)' if spec == 'mean' else ''}")


@app.command("info")
def info_command(
    spec: str = typer.Argument(DEFAULT_ENCODER, help="tile encoder spec, e.g. handcrafted or hf:/models/dinov2-small"),
    device: str = typer.Option("cpu", help="device for the model: cpu, cuda, cuda:1, mps"),
    region: bool = typer.Option(False, "--region", help="SPEC is a region encoder spec (mean, meanmax, vit:/dir)"),
) -> None:
    """Load one encoder and print its provenance as JSON."""
    try:
        encoder = get_region_encoder(spec, device=device) if region else get_encoder(spec, device=device)
    except EncoderError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(json.dumps(encoder.provenance(), indent=2))
