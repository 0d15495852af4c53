"""Configuration of a tuning run, stored as ``<run>/run.json`` and checked on ``--resume``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from slidevl.atomic import write_json_atomic
from slidevl.slidellm.connector import ConnectorConfig
from slidevl.slidellm.llm import EmbeddedLMConfig, LLMLoadOptions, LoraSettings
from slidevl.slidellm.answers import ANSWER_STYLES, DEFAULT_ANSWER_STYLE

STAGES = ("warmup", "stage1", "stage2")
LLM_TUNING = ("lora", "full")
#: Where each stage starts when no learning rate is given: the embedded LM learns from
#: scratch (high); the connector alone is aligned at 1e-3 (LLaVA's projector pre-training rate:
#: at 1e-4 a fresh Q-Former stays near its initialisation within a CPU-sized stage 1 and the
#: tuned model answered the same with real and shuffled visual tokens); connector + LoRA at
#: 5e-4 (the paper's 2e-4 suits a pretrained 7B LLM; with a from-scratch LM and a few hundred
#: CPU steps, 2e-4 moved the stage-2 loss only from 0.545 to 0.529).
DEFAULT_LR = {"warmup": 1e-3, "stage1": 1e-3, "stage2": 5e-4}


@dataclass
class TrainSettings:
    """Optimisation settings shared by every stage."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 200
    max_tokens: int = 1024
    bf16: bool = False
    cpu: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TuneConfig:
    """Everything that defines a run; two runs with equal configs train the same model.

    ``connector`` holds :class:`ConnectorConfig` fields except the two widths, which come
    from the encoder and the LLM. ``encoder`` is a topo-pack checkpoint folder; with
    ``encoder_init="random"`` only its architecture is used (the "no pretraining"
    ablation), and without a folder a default-size encoder is built from random weights.
    """

    stage: str
    records: str
    out: str
    train: TrainSettings = field(default_factory=TrainSettings)
    job: str | None = None
    feature_encoder: str | None = None
    encoder: str | None = None
    encoder_init: str = "pretrained"
    train_encoder: bool = False
    llm: str | None = None
    llm_options: LLMLoadOptions = field(default_factory=LLMLoadOptions)
    init: str | None = None
    connector: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    embedded_lm: EmbeddedLMConfig = field(default_factory=EmbeddedLMConfig)
    vocab_size: int = 4096
    answer_style: str = DEFAULT_ANSWER_STYLE
    shuffle_options: bool = True
    blind_warmup: bool = True
    llm_tuning: str = "lora"

    def __post_init__(self) -> None:
        # shuffle_options: choice options re-ordered every epoch (stages 1, 2 and the warm-up).
        # blind_warmup: the text-only warm-up pairs questions with other records' answers, so
        # the LM cannot learn training answers by heart from the question text.
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, got {self.answer_style!r}")
        # llm_tuning (stage 2): "lora" trains adapters (the paper; the only sane choice for a 7B
        # model); "full" trains every LLM weight, which suits the small embedded LM that was
        # itself trained from scratch on this QA text.
        if self.llm_tuning not in LLM_TUNING:
            raise ValueError(f"llm_tuning must be one of {LLM_TUNING}, got {self.llm_tuning!r}")
        if self.llm_tuning == "full" and self.llm_options.load_in_4bit:
            raise ValueError("a 4-bit LLM cannot be tuned in full; use llm_tuning='lora' (QLoRA) or drop load_in_4bit")
        if self.encoder_init not in ("pretrained", "random"):
            raise ValueError(f"encoder_init must be 'pretrained' or 'random', got {self.encoder_init!r}")
        if {"vision_dim", "llm_dim", "patch_dim"} & set(self.connector):
            raise ValueError(
                "connector widths come from the encoder, the LLM and the features; do not set vision_dim/llm_dim/patch_dim"
            )
        # Validate the connector choices now rather than after minutes of caching; with
        # --init the kind and widths come from the checkpoint, so prepare_stage checks them.
        if self.init is None:
            self.connector_config(1, 1, 1)

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.stage]

    def connector_config(self, vision_dim: int, llm_dim: int, patch_dim: int) -> ConnectorConfig:
        """The connector's config; ``patch_dim`` is used only when the connector reads patches."""
        config = ConnectorConfig(vision_dim=vision_dim, llm_dim=llm_dim, **self.connector)
        return replace(config, patch_dim=patch_dim if config.use_patches else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneConfig":
        data = dict(data)
        nested = {
            "train": TrainSettings,
            "llm_options": LLMLoadOptions,
            "lora": LoraSettings,
            "embedded_lm": EmbeddedLMConfig,
        }
        for key, kind in nested.items():
            if key in data:
                data[key] = kind(**data[key])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run config fields {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TuneConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def config_differences(saved: TuneConfig, new: TuneConfig) -> list[str]:
    """Human-readable list of settings that differ between two runs (for ``--resume``)."""
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    return [f"{k}: run has {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
