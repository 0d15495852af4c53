"""``slidevl slidellm``: commands of the slide-LLM stack (encoder pretraining, language warm-up, stage 1 and 2 tuning)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from slidevl.cli_errors import ReportingGroup
from slidevl.slidellm.tuning.cli import app as tuning_app

app = typer.Typer(cls=ReportingGroup, help="Slide-level vision-language model: encoder pretraining, language warm-up, stage 1 and 2 tuning.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Slide-level vision-language model (Hepato-LLaVA style): topo-pack slide encoder."""


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def pretrain(
    features: Path = typer.Option(..., "--features", help="Feature job folder (holds features/<encoder>/*.h5)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to create (or resume)."),
    feature_encoder: Optional[str] = typer.Option(None, "--feature-encoder", help="Feature encoder folder under <job>/features; needed when there are several."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue from the checkpoint in --out; model settings come from it (a stopped run continues without it too)."),
    mae_steps: Optional[int] = typer.Option(None, help="MAE optimiser steps [1000]."),
    moco_steps: Optional[int] = typer.Option(None, help="MoCo optimiser steps after MAE [500]."),
    phase1_fraction: Optional[float] = typer.Option(None, help="Share of MAE steps masking patches within packs; the rest mask whole packs [0.5]."),
    mask_ratio: Optional[float] = typer.Option(None, help="MAE mask ratio [0.75]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [1.5e-4]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps [50]."),
    batch_slides: Optional[int] = typer.Option(None, help="Slides per micro-batch (padded) [1]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimiser step [1]."),
    max_packs: Optional[int] = typer.Option(None, help="Crop slides to at most this many packs per view [4096]."),
    moco_queue: Optional[int] = typer.Option(None, help="MoCo queue length [8192]."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16 | fp16 [no]."),
    seed: Optional[int] = typer.Option(None, help="Random seed [0]."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps [200]."),
    d_model: Optional[int] = typer.Option(None, help="Encoder width [512]."),
    layers: Optional[int] = typer.Option(None, help="Encoder layers [6]."),
    heads: Optional[int] = typer.Option(None, help="Attention heads [8]."),
    ffn_dim: Optional[int] = typer.Option(None, help="FFN width [2048]."),
    dropout: Optional[float] = typer.Option(None, help="Dropout [0.1]."),
    mask_variant: Optional[str] = typer.Option(None, help="topo | patch_sees_summary | dense [topo]."),
    pos_encoding: Optional[bool] = typer.Option(None, "--pos-encoding/--no-pos-encoding", help="2-D pack-grid positions [on]."),
    attention_impl: Optional[str] = typer.Option(None, help="auto | split | gather | flex | dense [auto]."),
    checkpoint_layers: Optional[bool] = typer.Option(None, "--checkpoint-layers/--no-checkpoint-layers", help="Recompute layers in backward to save memory [off]."),
    stop_after: Optional[int] = typer.Option(None, help="Stop (with a checkpoint) after this many steps in total."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on CPU even if a GPU is present."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Pretrain the topo-pack slide encoder on stored features: MAE (patches, then packs), then MoCo."""
    from slidevl.errors import InputError
    from slidevl.interrupts import resumable
    from slidevl.ranks import is_main_process
    from slidevl.slidellm.encoder.config import TopoPackConfig
    from slidevl.slidellm.pretrain.checkpoint import (
        CONFIG_NAME,
        PRETRAIN_CONFIG,
        checkpoint_steps,
        describe_checkpoint,
        has_checkpoint,
    )
    from slidevl.slidellm.pretrain.config import PretrainConfig
    from slidevl.slidellm.pretrain.data import FeatureStoreSource, encoder_config_for
    from slidevl.slidellm.pretrain.trainer import pretrain as run_pretrain

    train_options = _given(
        mae_steps=mae_steps,
        moco_steps=moco_steps,
        phase1_fraction=phase1_fraction,
        mask_ratio=mask_ratio,
        lr=lr,
        warmup_steps=warmup_steps,
        batch_slides=batch_slides,
        grad_accum=grad_accum,
        max_packs=max_packs,
        moco_queue=moco_queue,
        mixed_precision=mixed_precision,
        seed=seed,
        save_every=save_every,
    )
    model_options = _given(
        d_model=d_model,
        n_layers=layers,
        n_heads=heads,
        ffn_dim=ffn_dim,
        dropout=dropout,
        mask_variant=mask_variant,
        pos_encoding=pos_encoding,
        attention_impl=attention_impl,
        checkpoint_layers=checkpoint_layers,
    )
    steps = checkpoint_steps(out)
    # The command that was stopped (or split with --stop-after), run again, continues.
    if not resume and steps is not None and steps[0] < steps[1]:
        resume = True
        if is_main_process():
            typer.echo(f"resuming: {describe_checkpoint(out)}", err=True)
    source = FeatureStoreSource(features, feature_encoder)
    if resume and has_checkpoint(out):
        # Saved settings, with the options given on this command line on top; the
        # trainer refuses changes that would alter the model or the losses.
        config = replace(PretrainConfig.load(out / PRETRAIN_CONFIG), **train_options)
        encoder_config = replace(TopoPackConfig.load(out / CONFIG_NAME), **model_options)
    else:
        config = PretrainConfig(**train_options)
        ids = source.slide_ids()
        if not ids:
            raise InputError(f"{source.store.root}: no feature files; run `slidevl preprocess` first")
        encoder_config = encoder_config_for(source, **model_options)
    with resumable(lambda: describe_checkpoint(out)):
        result = run_pretrain(
            source,
            out,
            config=config,
            encoder_config=encoder_config,
            resume=resume,
            progress=not quiet,
            stop_after=stop_after,
            cpu=True if cpu else None,
        )
    if is_main_process():
        last = result.log[-1] if result.log else {}
        loss = f", last loss {last['loss']:.4f}" if "loss" in last else ""
        typer.echo(f"{result.out_dir}: step {result.step}{loss}; encoder in {result.out_dir / 'encoder.safetensors'}")


@app.command()
def convert(
    old: Path = typer.Argument(..., help="A checkpoint (or its run folder) written before config.json: slidevlm.json + encoder/."),
    new: Path = typer.Argument(..., help="The folder to write the converted checkpoint into (must not exist)."),
) -> None:
    """Rewrite an old slide-LLM checkpoint as one config.json plus weights (older ones also load as they are)."""
    from slidevl.slidellm.checkpoint_layout import convert_checkpoint

    folder = convert_checkpoint(old, new)
    typer.echo(f"{folder.directory}: {folder.config.stage} checkpoint with config.json; use it as --checkpoint or --init")


# The tuning stages live with their own code; without a name, their commands join this group.
app.add_typer(tuning_app)
