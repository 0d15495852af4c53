"""Resumable trainer state without pickle: optimizer, scheduler, RNG and counters.

``torch.save`` of an optimizer pickles it, and loading a pickle can run code, so the
state is split instead: every tensor goes to a safetensors file and the rest (hyper-
parameters, step counters, scheduler fields) to JSON. Directories are replaced as a
whole (:func:`atomic_dir`) so a killed run leaves the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file

from slidevl.atomic import write_json_atomic
from slidevl.errors import CheckpointError
from slidevl.slidellm.encoder.io import save_state_dict


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``target`` in one rename.

    An existing ``target`` is first moved aside and deleted only after the new one is in
    place, so at every moment either the old or the new complete folder exists.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete (re-run the stage without --resume)")
    return load_file(str(path), device=str(device))


def _split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    # Tensors are replaced by {"__tensor__": key}; everything else must be JSON-able.
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[_json_key(k), _split_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {"__list__": [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)], "tuple": isinstance(state, tuple)}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise CheckpointError(f"cannot store {type(state).__name__} at {prefix!r} in a checkpoint without pickle")


def _json_key(key: Any) -> Any:
    if not isinstance(key, (int, str)):
        raise CheckpointError(f"state dict key {key!r} is neither int nor str")
    return key


def _join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join_state(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(directory: Path, name: str, state: dict[str, Any]) -> None:
    """Store a nested state dict as ``<name>.safetensors`` (tensors) + ``<name>.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_state(state, name, tensors)
    save_state_dict(tensors, directory / f"{name}.safetensors")
    write_json_atomic(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> dict[str, Any]:
    """Inverse of :func:`save_state`."""
    skeleton_path = directory / f"{name}.json"
    if not skeleton_path.is_file():
        raise CheckpointError(f"{skeleton_path}: not found; the checkpoint is incomplete")
    tensors = load_tensors(directory / f"{name}.safetensors")
    return _join_state(json.loads(skeleton_path.read_text()), tensors)


def state_part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a module's state dict under ``prefix`` (e.g. ``"vlm.connector."``), without the prefix."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def load_state_entry(directory: Path, name: str, key: str) -> Any:
    """One top-level entry of a :func:`save_state` state that holds no tensor, read without the tensors file.

    Reporting a run's step must not load its optimizer state, gigabytes for a 7B LoRA run.
    """
    skeleton_path = directory / f"{name}.json"
    if not skeleton_path.is_file():
        raise CheckpointError(f"{skeleton_path}: not found; the checkpoint is incomplete")
    for entry, value in json.loads(skeleton_path.read_text())["__dict__"]:
        if entry == key:
            return _join_state(value, {})
    raise CheckpointError(f"{skeleton_path}: no {key!r} entry")


def rng_state() -> dict[str, Any]:
    """Global torch RNG states (CPU and every CUDA device): dropout draws depend on them."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])
