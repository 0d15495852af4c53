"""Pretraining checkpoints: safetensors weights, JSON configs, plain-tensor train state.

A checkpoint folder holds::

    encoder.safetensors, encoder_config.json   the encoder alone (load_encoder(folder))
    pretrain_state.safetensors                  decoder, heads, momentum networks, queue
    pretrain_config.json                        the PretrainConfig
    train_state.pt                              optimiser state, step, RNG and data order
                                                (plain tensors/dicts; loaded weights_only)
    loss_log.csv, loss_log.json                 one row per optimiser step
    checkpoint.json                             manifest, written last

Every file is written atomically and the manifest last, so a folder whose manifest
names step s holds a complete step-s checkpoint; the train state repeats the step and
a mismatch (a crash between files) is reported instead of resumed from.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from slidevl import __version__
from slidevl.atomic import atomic_path, write_json_atomic, write_text_atomic
from slidevl.errors import CheckpointError
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.io import CONFIG_NAME, WEIGHTS_NAME, save_encoder, save_state_dict
from slidevl.slidellm.pretrain.config import PretrainConfig

MANIFEST = "checkpoint.json"
STATE_WEIGHTS = "pretrain_state.safetensors"
TRAIN_STATE = "train_state.pt"
PRETRAIN_CONFIG = "pretrain_config.json"
LOSS_CSV = "loss_log.csv"
LOSS_JSON = "loss_log.json"
FORMAT = "slidevl-topo-pretrain"


@dataclass
class Checkpoint:
    """Everything needed to resume a run."""

    step: int
    encoder_config: TopoPackConfig
    config: PretrainConfig
    weights: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    log: list[dict[str, Any]]


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def checkpoint_steps(directory: str | Path) -> tuple[int, int] | None:
    """(steps done, steps planned) from the manifest alone, or None without a checkpoint."""
    if not has_checkpoint(directory):
        return None
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    return int(manifest["step"]), int(manifest["total_steps"])


def describe_checkpoint(directory: str | Path) -> str:
    """Where a stopped pretraining run will continue from, for the interrupt line."""
    steps = checkpoint_steps(directory)
    if steps is None:
        return f"no checkpoint yet in {directory} (one is written every --save-every steps), so the run starts again"
    return f"step {steps[0]} of {steps[1]} is checkpointed in {directory}"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_loss_log(directory: str | Path, log: list[dict[str, Any]]) -> None:
    """Write the per-step loss log as CSV and JSON (atomically)."""
    directory = Path(directory)
    rows = [{k: _clean(v) for k, v in row.items()} for row in log]
    write_json_atomic(directory / LOSS_JSON, rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text_atomic(directory / LOSS_CSV, buf.getvalue())


def save_checkpoint(
    directory: str | Path,
    *,
    step: int,
    encoder,
    state: dict[str, torch.Tensor],
    config: PretrainConfig,
    train_state: dict[str, Any],
    log: list[dict[str, Any]],
) -> Path:
    """Write a complete checkpoint for ``step`` completed optimiser steps."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_encoder(encoder, directory)
    save_state_dict(state, directory / STATE_WEIGHTS, metadata={"format": FORMAT, "step": str(step)})
    config.save(directory / PRETRAIN_CONFIG)
    with atomic_path(directory / TRAIN_STATE) as tmp:
        torch.save({**train_state, "step": step}, tmp)
    write_loss_log(directory, log)
    write_json_atomic(
        directory / MANIFEST,
        {
            "format": FORMAT,
            "step": step,
            "total_steps": config.total_steps,
            "stage": list(config.stage(max(step - 1, 0))),
            "files": [WEIGHTS_NAME, CONFIG_NAME, STATE_WEIGHTS, PRETRAIN_CONFIG, TRAIN_STATE, LOSS_CSV, LOSS_JSON],
            "slidevl_version": __version__,
        },
    )
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (no unpickling of objects)."""
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a pretraining checkpoint (or it never finished writing)")
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [name for name in manifest.get("files", []) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: checkpoint files missing: {missing}")
    train_state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    step = int(manifest["step"])
    if int(train_state.get("step", -1)) != step:
        raise CheckpointError(
            f"{directory}: manifest says step {step} but train_state.pt holds step {train_state.get('step')}; "
            "the checkpoint was interrupted while being written"
        )
    log = json.loads((directory / LOSS_JSON).read_text())
    return Checkpoint(
        step=step,
        encoder_config=TopoPackConfig.load(directory / CONFIG_NAME),
        config=PretrainConfig.load(directory / PRETRAIN_CONFIG),
        weights=load_file(str(directory / STATE_WEIGHTS), device=str(map_location)),
        train_state=train_state,
        log=[row for row in log if int(row["step"]) <= step],
    )
