"""The slide VLM's one config: encoder, connector and LLM settings, nested.

:class:`SlideVLMConfig` is what a checkpoint's ``config.json`` holds (tagged with its
class, :meth:`~slidevl.config.Config.save_pretrained`): everything needed to rebuild the
model around its weights, plus the data it was trained on (the feature job, for new
slides to be preprocessed the same way) and how it writes choice answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from slidevl.config import Config, setting
from slidevl.errors import ConfigError
from slidevl.slidellm.answers import ANSWER_STYLES, DEFAULT_ANSWER_STYLE
from slidevl.slidellm.connector import ConnectorConfig
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.llm import LLMLoadOptions, LoraSettings

#: What was tuned of the LLM: nothing (stage 1, represent), LoRA adapters, or every weight.
LLM_TUNINGS = ("frozen", "lora", "full")
#: The stages whose output folder is a slide-VLM checkpoint.
VLM_STAGES = ("represent", "stage1", "stage2")


@dataclass
class LLMSettings(Config):
    """The language half: the base model it starts from, how it is loaded, and what was tuned."""

    base: str = setting(help="The base causal LM's folder; referenced by path, not copied.")
    options: LLMLoadOptions = setting(help="How the LLM is loaded (dtype, 4-bit).", default_factory=LLMLoadOptions)
    tuning: str = setting("frozen", help="'frozen', 'lora' (adapters in adapter/) or 'full' (every weight, in llm/).")
    lora: Optional[LoraSettings] = setting(None, help="The LoRA adapters' settings, with tuning 'lora'.")

    def __post_init__(self) -> None:
        if self.tuning not in LLM_TUNINGS:
            raise ConfigError(f"llm tuning must be one of {LLM_TUNINGS}, got {self.tuning!r}")
        if (self.lora is not None) != (self.tuning == "lora"):
            raise ConfigError(f"LoRA settings go with llm tuning 'lora' and only with it (tuning {self.tuning!r})")


@dataclass
class SlideVLMConfig(Config):
    """The slide VLM: topo-pack encoder → connector → causal LM, and where its training data was."""

    stage: str = setting(help="The stage that wrote the checkpoint: represent, stage1 or stage2.")
    encoder: TopoPackConfig = setting(help="The topo-pack slide encoder.")
    connector: ConnectorConfig = setting(help="The connector from encoder tokens to the LLM's width.")
    llm: LLMSettings = setting(help="The LLM: base model, load options, LoRA.")
    answer_style: str = setting(DEFAULT_ANSWER_STYLE, help="How choice answers were written in training.")
    job: Optional[str] = setting(None, help="The feature job the model was trained on.")
    feature_encoder: Optional[str] = setting(None, help="The feature folder under <job>/features.")

    def __post_init__(self) -> None:
        if self.stage not in VLM_STAGES:
            raise ConfigError(f"stage must be one of {VLM_STAGES}, got {self.stage!r}")
        if self.answer_style not in ANSWER_STYLES:
            raise ConfigError(f"answer_style must be one of {ANSWER_STYLES}, got {self.answer_style!r}")
        # The connector reads the encoder's tokens (and the features the encoder reads).
        if self.connector.vision_dim != self.encoder.d_model:
            raise ConfigError(
                f"connector vision_dim {self.connector.vision_dim} differs from the encoder's width {self.encoder.d_model}"
            )
        if self.connector.patch_dim not in (0, self.encoder.patch_dim):
            raise ConfigError(
                f"connector patch_dim {self.connector.patch_dim} differs from the encoder's patch_dim {self.encoder.patch_dim}"
            )
