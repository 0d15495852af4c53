"""The slide-VLM checkpoint folder: one ``config.json`` and the weights, nothing pickled.

Layout of ``<run>/checkpoint`` (written by ``represent``, ``stage1`` and ``stage2``)::

    config.json                  SlideVLMConfig: stage, encoder, connector, LLM (base, options,
                                 tuning, LoRA), answer style, training feature job
    encoder.safetensors          topo-pack encoder
    connector.safetensors        connector, with its fitted standardisers
    tokenizer/                   tokenizer with the <image> placeholder and chat template
    adapter/                     LoRA adapters (peft), stage 2 with LoRA
    llm/                         the whole tuned LLM, stage 2 with ``llm_tuning="full"`` only
    represent_heads.safetensors  the representation stage's own heads, for its --resume
    trainer/                     optimizer, scheduler, RNG and counters, for --resume

The base LLM is referenced by path, not copied: a 7B model stays where it is (unless
all of its weights were tuned, when they are the checkpoint's own ``llm/``).

Folders written before ``config.json`` spread the settings over ``slidevlm.json`` and
``encoder/encoder_config.json`` (LoRA settings in the adapter's peft config) and kept the
encoder weights in ``encoder/``. :func:`open_checkpoint` reads them in memory, so they
load and resume as they are; :func:`convert_checkpoint` rewrites one in this layout.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slidevl.config import CLASS_KEY, CONFIG_NAME, read_mapping
from slidevl.errors import CheckpointError, ConfigError
from slidevl.slidellm.answers import DEFAULT_ANSWER_STYLE
from slidevl.slidellm.connector import ConnectorConfig
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.io import save_state_dict
from slidevl.slidellm.encoder.model import TopoPackEncoder
from slidevl.slidellm.llm import LLMLoadOptions, LoraSettings
from slidevl.slidellm.tuning.state import atomic_dir, load_tensors
from slidevl.slidellm.vlm_config import LLMSettings, SlideVLMConfig

CHECKPOINT_DIR = "checkpoint"
ENCODER_WEIGHTS = "encoder.safetensors"
CONNECTOR_WEIGHTS = "connector.safetensors"
TOKENIZER_DIR = "tokenizer"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"
#: The files of the layout before config.json.
LEGACY_INFO = "slidevlm.json"
LEGACY_FORMAT = "slidevl.slidevlm"
LEGACY_ENCODER_DIR = "encoder"


@dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder, its config, and where each part's files are."""

    directory: Path
    config: SlideVLMConfig
    legacy: bool = False  # written before config.json; read in memory

    @property
    def encoder_weights(self) -> Path:
        return self.directory / LEGACY_ENCODER_DIR / ENCODER_WEIGHTS if self.legacy else self.directory / ENCODER_WEIGHTS

    @property
    def connector_weights(self) -> Path:
        return self.directory / CONNECTOR_WEIGHTS

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER_DIR

    @property
    def adapter_dir(self) -> Path | None:
        return self.directory / ADAPTER_DIR if self.config.llm.tuning == "lora" else None

    @property
    def llm_dir(self) -> Path:
        """Where the LLM's weights are: the checkpoint's own ``llm/`` when tuned in full, else the base model."""
        return self.directory / LLM_DIR if self.config.llm.tuning == "full" else Path(self.config.llm.base)


def open_checkpoint(path: str | Path) -> CheckpointFolder:
    """The checkpoint in ``path``, a run folder or its ``checkpoint/``, in either layout.

    A folder of another kind (a Hugging Face model, an encoder, a survival run) is refused
    with what it holds and what to pass instead.
    """
    path = Path(path).expanduser()
    for candidate in (path, path / CHECKPOINT_DIR):
        config_file = candidate / CONFIG_NAME
        if config_file.is_file():
            return CheckpointFolder(candidate, _read_config(config_file))
        if (candidate / LEGACY_INFO).is_file():
            return CheckpointFolder(candidate, read_legacy(candidate), legacy=True)
    raise CheckpointError(
        f"{path}: no slide-LLM checkpoint ({CONFIG_NAME}) here or in {path / CHECKPOINT_DIR}; pass the output folder of "
        "`slidevl slidellm stage1` or `stage2`"
    )


def _read_config(path: Path) -> SlideVLMConfig:
    data = read_mapping(path)
    kind = data.get(CLASS_KEY)
    if kind != SlideVLMConfig.__name__:
        what = f"a {kind}" if kind else (
            f"a Hugging Face {data['model_type']} model config" if "model_type" in data else "no config_class tag")
        raise CheckpointError(
            f"{path} holds {what}, not a slide-LLM checkpoint ({SlideVLMConfig.__name__}); pass the output folder of "
            "`slidevl slidellm stage1` or `stage2`"
        )
    try:
        return SlideVLMConfig.from_dict(data, source=str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def read_legacy(directory: Path) -> SlideVLMConfig:
    """The config of a checkpoint written before ``config.json``, from the files that held its parts."""
    info_path = directory / LEGACY_INFO
    info = read_mapping(info_path)
    if info.get("format") != LEGACY_FORMAT or info.get("version") != 1:
        raise CheckpointError(
            f"{info_path}: not a slide-LLM checkpoint this version reads (format {info.get('format')!r}, "
            f"version {info.get('version')!r})"
        )
    encoder_config = directory / LEGACY_ENCODER_DIR / "encoder_config.json"
    tuning = "full" if info.get("tuned_llm") else "lora" if info.get("has_adapter") else "frozen"
    try:
        llm = LLMSettings(
            base=info["llm"],
            options=LLMLoadOptions.from_dict(info.get("llm_options", {}), source=str(info_path)),
            tuning=tuning,
            lora=_legacy_lora(directory / ADAPTER_DIR) if tuning == "lora" else None,
        )
        return SlideVLMConfig(
            stage=info["stage"],
            encoder=TopoPackConfig.load(encoder_config),
            connector=ConnectorConfig.from_dict(info["connector"], source=str(info_path)),
            llm=llm,
            answer_style=info.get("answer_style", DEFAULT_ANSWER_STYLE),
            job=info.get("job"),
            feature_encoder=info.get("feature_encoder"),
        )
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{directory}: incomplete checkpoint of the layout before {CONFIG_NAME}: {exc}") from None


def _legacy_lora(adapter_dir: Path) -> LoraSettings:
    # peft's own config held them; it lists the adapted modules by full name.
    peft = read_mapping(adapter_dir / "adapter_config.json")
    targets = peft["target_modules"]
    if isinstance(targets, list):
        targets = ",".join(sorted({name.rsplit(".", 1)[-1] for name in targets}))
    return LoraSettings(r=int(peft["r"]), alpha=int(peft["lora_alpha"]), dropout=float(peft["lora_dropout"]),
                        target_modules=targets)


def load_checkpoint_encoder(folder: CheckpointFolder) -> TopoPackEncoder:
    """The checkpoint's topo-pack encoder with its weights (trainable; the caller freezes it)."""
    encoder = TopoPackEncoder(folder.config.encoder)
    encoder.load_state_dict(load_tensors(folder.encoder_weights), strict=True)
    return encoder


def save_checkpoint_parts(directory: Path, config: SlideVLMConfig, connector_state: dict[str, torch.Tensor],
                          encoder_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase) -> None:
    """The parts every checkpoint has: ``config.json``, connector and encoder weights, tokenizer (no LLM weights)."""
    config.save_pretrained(directory)
    save_state_dict(connector_state, directory / CONNECTOR_WEIGHTS, metadata={"format": "pt"})
    save_state_dict(encoder_state, directory / ENCODER_WEIGHTS, metadata={"format": "pt"})
    tokenizer.save_pretrained(directory / TOKENIZER_DIR)


def convert_checkpoint(old: str | Path, new: str | Path) -> CheckpointFolder:
    """Write the checkpoint in ``old`` (layout before ``config.json``) into ``new`` in this layout.

    The weights are copied byte for byte; training state (``trainer/``) is copied too, so
    the converted run still resumes. ``new`` must not exist yet.
    """
    source = open_checkpoint(old)
    if not source.legacy:
        raise CheckpointError(f"{source.directory} already has the {CONFIG_NAME} layout; nothing to convert")
    target = Path(new).expanduser()
    if target.exists():
        raise CheckpointError(f"{target}: already exists; pass a new folder for the converted checkpoint")
    replaced = {LEGACY_INFO, LEGACY_ENCODER_DIR}  # by config.json and encoder.safetensors
    with atomic_dir(target) as tmp:
        for item in source.directory.iterdir():
            if item.name in replaced:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        shutil.copy2(source.encoder_weights, tmp / ENCODER_WEIGHTS)
        source.config.save_pretrained(tmp)
    return open_checkpoint(target)
