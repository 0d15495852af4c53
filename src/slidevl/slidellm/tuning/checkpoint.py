"""The slide-LLM checkpoint folder: what ``stage1``/``stage2`` write and ``ask`` loads.

Layout (everything safetensors or JSON, nothing pickled)::

    <run>/checkpoint/
        slidevlm.json           stage, base LLM folder, connector config, feature job
        connector.safetensors
        encoder/                topo-pack encoder (encoder.safetensors + encoder_config.json)
        tokenizer/              tokenizer with the <image> placeholder and chat template
        adapter/                LoRA adapters (peft ``save_pretrained``), stage 2 with LoRA
        llm/                    the whole tuned LLM, stage 2 with ``llm_tuning="full"`` only
        represent_heads.safetensors  the representation stage's own heads (text side, ITC/ITM/LM heads), for
                                its --resume; no later stage reads them
        trainer/                optimizer, scheduler, RNG and counters for --resume

The base LLM is referenced by path, not copied: a 7B model stays where it is (unless
all of its weights were tuned, when they are the checkpoint's own ``llm/``). The
language warm-up writes ``<run>/checkpoint/llm/``, an ordinary Hugging Face model folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from slidevl.atomic import write_json_atomic
from slidevl.errors import CheckpointError
from slidevl.slidellm.answers import DEFAULT_ANSWER_STYLE
from slidevl.slidellm.connector import ConnectorConfig, build_connector
from slidevl.slidellm.encoder import TopoPackEncoder, load_encoder, save_encoder
from slidevl.slidellm.llm import LLMLoadOptions, freeze, load_llm, load_lora
from slidevl.slidellm.model import SlideVLM
from slidevl.slidellm.tokenizer import image_token_id, load_tokenizer
from slidevl.slidellm.tuning.state import load_tensors, save_tensors, state_part

CHECKPOINT_DIR = "checkpoint"
INFO_NAME = "slidevlm.json"
FORMAT = "slidevl.slidevlm"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    """Contents of ``slidevlm.json``."""

    stage: str
    llm: str
    connector: dict[str, Any]
    has_adapter: bool
    llm_options: dict[str, Any] = field(default_factory=dict)
    tuned_llm: bool = False
    answer_style: str = DEFAULT_ANSWER_STYLE
    job: str | None = None
    feature_encoder: str | None = None
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "CheckpointInfo":
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a slide-LLM checkpoint (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {data.get('version')} is not supported (expected {FORMAT_VERSION})")
        return cls(**data)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or its ``checkpoint`` folder; return the folder with ``slidevlm.json``."""
    path = Path(path).expanduser()
    for candidate in (path, path / CHECKPOINT_DIR):
        if (candidate / INFO_NAME).is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no {INFO_NAME} here or in {path / CHECKPOINT_DIR}; pass the output folder of "
        "`slidevl slidellm stage1` or `stage2`"
    )


def resolve_llm_dir(path: str | Path) -> Path:
    """Accept a Hugging Face model folder or a warm-up run folder (``<run>/checkpoint/llm``)."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path / CHECKPOINT_DIR / "llm"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no config.json here or in {path / CHECKPOINT_DIR / 'llm'}; pass a Hugging Face causal-LM folder "
        "or the output folder of `slidevl slidellm warmup`"
    )


def save_connector_checkpoint(
    directory: Path,
    info: CheckpointInfo,
    connector_state: dict[str, torch.Tensor],
    encoder: TopoPackEncoder,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The parts every checkpoint has: info, connector weights, encoder, tokenizer (no LLM weights)."""
    info.save(directory / INFO_NAME)
    save_tensors(directory / "connector.safetensors", connector_state, metadata={"format": "pt"})
    save_encoder(encoder, directory / "encoder")
    tokenizer.save_pretrained(directory / "tokenizer")


def save_vlm(
    directory: Path,
    info: CheckpointInfo,
    model: SlideVLM,
    encoder: TopoPackEncoder,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
) -> None:
    """Write the model parts of a checkpoint into ``directory`` (the caller makes it atomic).

    The weights come from ``state``, the trained module's state dict (keys ``vlm.…``):
    under FSDP only that gathered copy is whole, the live modules hold shards.
    """
    save_connector_checkpoint(directory, info, state_part(state, "vlm.connector."), encoder, tokenizer)
    llm_state = state_part(state, "vlm.llm.")
    if info.has_adapter:
        if not isinstance(model.llm, PeftModel):
            raise CheckpointError("the checkpoint claims LoRA adapters but the LLM has none")
        model.llm.save_pretrained(directory / "adapter", state_dict=llm_state)
    if info.tuned_llm:
        model.llm.save_pretrained(directory / "llm", state_dict=llm_state)


def checkpoint_llm_dir(directory: Path, info: CheckpointInfo) -> Path:
    """Where a checkpoint's LLM weights are: its own ``llm/`` when tuned in full, else the base model."""
    return directory / "llm" if info.tuned_llm else Path(info.llm)


def load_connector_weights(model: SlideVLM, directory: Path) -> None:
    model.connector.load_state_dict(load_tensors(directory / "connector.safetensors"), strict=True)


def load_checkpoint_encoder(directory: Path) -> TopoPackEncoder:
    enc_dir = directory / "encoder"
    if not enc_dir.is_dir():
        raise CheckpointError(f"{enc_dir}: missing; the checkpoint is incomplete")
    return load_encoder(enc_dir)


@dataclass
class LoadedVLM:
    """Everything needed to answer questions: model, frozen encoder, tokenizer, info."""

    model: SlideVLM
    encoder: TopoPackEncoder
    tokenizer: PreTrainedTokenizerBase
    info: CheckpointInfo
    directory: Path


def load_vlm(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    llm_options: LLMLoadOptions | None = None,
    trainable_adapter: bool = False,
) -> LoadedVLM:
    """Load a checkpoint for inference (everything frozen, eval mode) or to continue from it.

    ``llm_options`` overrides how the base LLM is loaded (dtype, 4-bit); by default the
    options used in training are reused.
    """
    directory = resolve_checkpoint(path)
    info = CheckpointInfo.load(directory / INFO_NAME)
    tokenizer = load_tokenizer(directory / "tokenizer")
    options = llm_options or LLMLoadOptions(**info.llm_options)
    llm_dir = checkpoint_llm_dir(directory, info)
    if not (llm_dir / "config.json").is_file():
        raise CheckpointError(
            f"{directory}: its base LLM {llm_dir} is missing; restore that folder (the checkpoint references it by path)"
        )
    llm = freeze(load_llm(llm_dir, options))
    if info.has_adapter:
        llm = load_lora(llm, directory / "adapter", trainable=trainable_adapter)
    connector = build_connector(ConnectorConfig.from_dict(info.connector))
    model = SlideVLM(connector, llm, image_token_id=image_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id)
    load_connector_weights(model, directory)
    encoder = freeze(load_checkpoint_encoder(directory))
    # A 4-bit LLM was placed on its GPU by bitsandbytes and cannot be moved.
    (model.connector if options.load_in_4bit else model).to(device)
    encoder.to(device)
    return LoadedVLM(model.eval(), encoder.eval(), tokenizer, info, directory)
