"""The tuning stages' side of the checkpoint folder: what they load to answer, and the LLM they start from.

The folder's layout (one ``config.json`` and the weights) is
:mod:`slidevl.slidellm.checkpoint_layout`; :meth:`SlideVLM.from_pretrained` and
:meth:`SlideVLM.save_pretrained` read and write it. The language warm-up writes
``<run>/checkpoint/llm/``, an ordinary Hugging Face model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slidevl.errors import CheckpointError
from slidevl.slidellm.checkpoint_layout import CHECKPOINT_DIR, LLM_DIR, open_checkpoint
from slidevl.slidellm.encoder import TopoPackEncoder
from slidevl.slidellm.llm import LLMLoadOptions
from slidevl.slidellm.model import SlideVLM
from slidevl.slidellm.tokenizer import load_tokenizer
from slidevl.slidellm.vlm_config import SlideVLMConfig


def resolve_llm_dir(path: str | Path) -> Path:
    """Accept a Hugging Face model folder or a warm-up run folder (``<run>/checkpoint/llm``)."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path / CHECKPOINT_DIR / LLM_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no config.json here or in {path / CHECKPOINT_DIR / LLM_DIR}; pass a Hugging Face causal-LM folder "
        "or the output folder of `slidevl slidellm warmup`"
    )


@dataclass
class LoadedVLM:
    """A checkpoint ready to answer questions: the model (with its frozen encoder and config) and its tokenizer."""

    model: SlideVLM
    tokenizer: PreTrainedTokenizerBase
    directory: Path

    @property
    def encoder(self) -> TopoPackEncoder:
        assert self.model.encoder is not None  # from_pretrained always loads it
        return self.model.encoder

    @property
    def config(self) -> SlideVLMConfig:
        assert self.model.config is not None
        return self.model.config


def load_vlm(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    llm_options: LLMLoadOptions | None = None,
) -> LoadedVLM:
    """Load a checkpoint (a run folder or its ``checkpoint/``, either layout) for inference, everything frozen.

    ``llm_options`` overrides how the base LLM is loaded (dtype, 4-bit); by default the
    options used in training are reused.
    """
    folder = open_checkpoint(path)
    tokenizer = load_tokenizer(folder.tokenizer_dir)
    model = SlideVLM.from_pretrained(folder, tokenizer=tokenizer, device=device, llm_options=llm_options)
    return LoadedVLM(model, tokenizer, folder.directory)
