"""``slidevl encoders ...``: list the encoders, register downloaded weights, describe one encoder.

The lead registers :data:`app` under the top-level CLI; each command is also a plain
function of this package (:func:`available_encoders`, :func:`get_encoder`,
:func:`.user_config.register`). User errors print ``error: ...`` and exit with code 2,
as every command does (:mod:`slidevl.cli_errors`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from slidevl.cli_config import options_from
from slidevl.cli_errors import ReportingGroup
from slidevl.errors import InputError
from slidevl.features.encoders import user_config
from slidevl.features.encoders.clip_train import ClipTrainConfig, train_clip
from slidevl.features.encoders.presets import PRESETS, EncoderPreset
from slidevl.features.encoders.region import available_region_encoders, get_region_encoder
from slidevl.features.encoders.registry import DEFAULT_ENCODER, available_encoders, get_encoder
from slidevl.features.encoders.zeroshot_cli import zero_shot_command

app = typer.Typer(
    cls=ReportingGroup,
    help="Tile and region encoders: list them, register downloaded weights, inspect one.", no_args_is_help=True
)
app.command("zero-shot")(zero_shot_command)

NOT_REGISTERED = "—"
# Piped or captured output has no terminal width; rich would wrap the table to 80
# columns there, splitting rows and paths across lines and defeating `grep`. A table
# only takes the width its cells need, so a generous width just means "do not wrap".
PIPE_WIDTH = 1000
MARKDOWN_COLUMNS = (
    "spec",
    "model (download from)",
    "library: architecture",
    "input px @ mpp",
    "dim",
    "embedding",
    "licence",
    "gated",
    "weight files as shipped",
    "notes",
)


def _input_text(preset: EncoderPreset) -> str:
    if preset.resize != preset.input_size:
        return f"{preset.input_size} (from {preset.resize})"
    return str(preset.input_size)


def _mpp_text(preset: EncoderPreset) -> str:
    return f"{preset.mpp:g} ({preset.magnification:g}x)"


def preset_table_markdown() -> str:
    """The supported-encoders table of ``docs/encoders.md``, one row per preset."""
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for preset in PRESETS.values():
        cells = (
            f"`{preset.name}`",
            f"[{preset.hub_repo}](https://huggingface.co/{preset.hub_repo})",
            f"{preset.library}: `{preset.architecture}`",
            f"{_input_text(preset)} @ {_mpp_text(preset)}",
            str(preset.feature_dim),
            f"`{preset.pooling}`",
            preset.license,
            "yes" if preset.gated else "no",
            " or ".join(f"`{name}`" for name in preset.weight_files),
            preset.notes,
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _preset_table(paths: dict[str, Path]) -> Table:
    table = Table(title="named tile encoders: --encoder NAME (registered) or NAME:PATH", title_justify="left")
    for column in ("name", "library", "architecture", "input px", "mpp (mag.)", "dim", "embedding", "licence", "gated"):
        table.add_column(column, justify="right" if column == "dim" else "left")
    table.add_column("registered path", overflow="fold")
    for preset in PRESETS.values():
        path = paths.get(preset.name)
        # Text, not markup: a path may hold square brackets.
        shown = Text(NOT_REGISTERED if path is None else str(path))
        if path is not None and not path.exists():
            # Still listed: the loader would name the missing path too, but say it here first.
            shown.append(" (missing)", style="red")
        table.add_row(
            preset.name,
            preset.library,
            preset.architecture,
            _input_text(preset),
            _mpp_text(preset),
            str(preset.feature_dim),
            preset.pooling,
            preset.license,
            "yes" if preset.gated else "no",
            shown,
        )
    return table


def _list_json(paths: dict[str, Path]) -> dict[str, Any]:
    def registered(name: str) -> str | None:
        return str(paths[name]) if name in paths else None

    return {
        "config_file": str(user_config.config_file()),
        "presets": [{**preset.describe(), "registered_path": registered(preset.name)} for preset in PRESETS.values()],
        "tile_encoder_specs": available_encoders(),
        "default_tile_encoder": DEFAULT_ENCODER,
        "region_encoder_specs": available_region_encoders(),
        "default_region_encoder": "mean",
    }


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="print the preset records and spec forms as JSON"),
    markdown: bool = typer.Option(False, "--markdown", help="print the preset table of docs/encoders.md as Markdown"),
) -> None:
    """Show every named encoder (input, mpp, dimension, licence, registered path) and the other spec forms."""
    if as_json and markdown:
        raise InputError("--json and --markdown are two different outputs; pass one of them")
    if markdown:
        typer.echo(preset_table_markdown())
        return
    paths = user_config.registered_paths()
    if as_json:
        typer.echo(json.dumps(_list_json(paths), indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    console.print(_preset_table(paths))
    file = escape(str(user_config.config_file()))
    stray = sorted(set(paths) - set(PRESETS))
    if stray:
        console.print(
            f"[yellow]not a preset[/yellow], ignored: {escape(', '.join(stray))} in {file}; "
            "remove with `slidevl encoders unregister NAME`",
            soft_wrap=True,
        )
    console.print(f"paths registered in {file} (`slidevl encoders register NAME PATH`)", soft_wrap=True)
    # Plain echo, not rich: these lines are the stable, greppable part of the output.
    typer.echo("\ntile encoders:")
    for spec in available_encoders():
        typer.echo(f"  {spec}{'  (default)' if spec == DEFAULT_ENCODER else ''}")
    typer.echo("region encoders:")
    for spec in available_region_encoders():
        typer.echo(f"  {spec}{'  (default)' if spec == 'mean' else ''}")


@app.command("register")
def register_command(
    name: str = typer.Argument(..., help="preset name, e.g. uni (see `slidevl encoders list`)"),
    path: Path = typer.Argument(..., help="the folder downloaded from the hub, an HF cache folder, or the weight file"),
) -> None:
    """Record where NAME's weights are, so that `--encoder NAME` alone finds them."""
    stored = user_config.register(name, path)
    name = name.strip().lower()
    typer.echo(f"{name} -> {stored} (in {user_config.config_file()}); use it with --encoder {name}")


@app.command("unregister")
def unregister_command(name: str = typer.Argument(..., help="a registered name")) -> None:
    """Forget NAME's registered path."""
    removed = user_config.unregister(name)
    typer.echo(f"removed {name} -> {removed} from {user_config.config_file()}")


@app.command("info")
def info_command(
    spec: str = typer.Argument(DEFAULT_ENCODER, help="tile encoder spec, e.g. handcrafted, uni, uni:/models/uni"),
    device: str = typer.Option("cpu", help="device for the model: cpu, cuda, cuda:1, mps"),
    region: bool = typer.Option(False, "--region", help="SPEC is a region encoder spec (mean, meanmax, vit:/dir)"),
) -> None:
    """Load one encoder and print its provenance as JSON."""
    encoder = get_region_encoder(spec, device=device) if region else get_encoder(spec, device=device)
    typer.echo(json.dumps(encoder.provenance(), indent=2))


@app.command("train-clip")
@options_from(ClipTrainConfig, recipe_help="YAML/JSON file of ClipTrainConfig settings; options given here override it.")
def train_clip_command(
    config: ClipTrainConfig,
    cohort: Path = typer.Option(..., "--cohort", help="Synthetic cohort folder (with truth.json) the captions come from."),
    job: Path = typer.Option(..., "--job", help="Job folder of that cohort's slides (`slidevl preprocess`): its patch boxes."),
    out: Path = typer.Option(..., "--out", help="Folder for the open_clip model (load it as openclip:OUT) and report.json."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a small CLIP on the cohort's training patients, captions written from the planted truth."""
    report = train_clip(cohort, job, out, config, progress=progress, log=typer.echo)
    check = report["zero_shot_heldout"]
    typer.echo(
        f"zero-shot tissue accuracy on {check['n_tiles']} held-out tiles: {check['accuracy']:.3f}; "
        f"model: {out} (use --encoder openclip:{out}); report: {out / 'report.json'}"
    )
