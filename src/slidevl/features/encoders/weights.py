"""Find a preset's weight file in what the user downloaded, and load it strictly.

``PATH`` in ``NAME:PATH`` may be the folder as the hub ships it, a Hugging Face cache
folder (``models--org--name``, whose newest snapshot is used), or the weight file
itself. A load never falls back to random weights: a missing file, a missing or
unexpected key, or a shape mismatch is an :class:`EncoderError` naming the file, the
preset and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from slidevl.features.encoders.base import EncoderError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Wrappers that training scripts put around a state dict, and prefixes that DataParallel
# and torch.compile put before every key.
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def hub_snapshot(path: Path) -> Path:
    """The newest snapshot folder of a Hugging Face cache repository, else ``path`` itself."""
    snapshots = path / "snapshots"
    if path.name.startswith("models--") and snapshots.is_dir():
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return path


def find_weight_file(path: str | Path, preset_name: str, expected: tuple[str, ...]) -> Path:
    """The weight file for ``preset_name`` at ``path`` (a folder or the file itself)."""
    path = Path(path).expanduser()
    wanted = " or ".join(expected)
    if not path.exists():
        raise EncoderError(
            f"{preset_name}: {path} does not exist; expected the folder downloaded from the hub (holding {wanted}) "
            "or the weight file itself. Nothing is downloaded."
        )
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise EncoderError(
                f"{preset_name}: {path} is not a weight file (suffix {path.suffix or 'none'}); expected {wanted} "
                f"({', '.join(WEIGHT_SUFFIXES)})"
            )
        return path
    folder = hub_snapshot(path)
    for name in expected:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:12]
    raise EncoderError(
        f"{preset_name}: {folder} holds no {wanted} (found: {', '.join(found) or 'nothing'}); download the "
        "weights of this model into that folder, or pass the weight file itself as NAME:/path/to/file"
    )


def read_state_dict(file: Path, preset_name: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or pickled checkpoint, unwrapped and without DDP prefixes."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(file), device="cpu")
        else:
            # weights_only: a checkpoint is data; never run code from it.
            raw = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated downloads, HTML error pages saved as .bin, pickles with code
        raise EncoderError(
            f"{preset_name}: {file} could not be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            "download it again"
        ) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise EncoderError(f"{preset_name}: {file} does not hold a state dict of tensors; is it a model checkpoint?")
    state = dict(raw)
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], file: Path, preset_name: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that says what did not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:2]}")
        raise EncoderError(
            f"{preset_name}: {file} does not fit the {preset_name} architecture ({type(model).__name__}, "
            f"{len(own)} tensors): {'; '.join(parts)}. Is this the {preset_name} checkpoint? "
            "Check the file against the preset (`slidevl encoders list`)"
        )
    model.load_state_dict(state, strict=True)
