"""Configuration of a tuning run, stored as ``<run>/run.json`` and checked on ``--resume``.

Every field carries its help text, so ``slidevl slidellm warmup|represent|stage1|stage2``
(:mod:`slidevl.slidellm.tuning.cli`) generates its options from these classes and the
command line and the Python API share one default per setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from slidevl.config import CLASS_KEY, Config, read_mapping, setting
from slidevl.errors import ConfigError
from slidevl.slidellm.answers import ANSWER_STYLES, DEFAULT_ANSWER_STYLE
from slidevl.slidellm.connector import ConnectorConfig
from slidevl.slidellm.llm import EmbeddedLMConfig, LLMLoadOptions, LoraSettings

STAGES = ("warmup", "represent", "stage1", "stage2")
LLM_TUNING = ("lora", "full")
#: Where each stage starts when no learning rate is given: the embedded LM learns from
#: scratch (high); the connector alone is aligned at 1e-3 (LLaVA's projector pre-training rate:
#: at 1e-4 a fresh Q-Former stays near its initialisation within a CPU-sized stage 1 and the
#: tuned model answered the same with real and shuffled visual tokens); connector + LoRA at
#: 5e-4 (the paper's 2e-4 suits a pretrained 7B LLM; with a from-scratch LM and a few hundred
#: CPU steps, 2e-4 moved the stage-2 loss only from 0.545 to 0.529). The representation stage
#: trains the same fresh Q-Former as stage 1 does without it, at stage 1's rate.
DEFAULT_LR = {"warmup": 1e-3, "represent": 1e-3, "stage1": 1e-3, "stage2": 5e-4}
#: The schedule of each stage when ``epochs``/``batch_size``/``weight_decay`` are not given:
#: the best measured recipe (``recipes/vqa.yaml``, 0.905 single-choice accuracy in
#: ``benchmarks/results/vqa_ss_fresh_3ep.md``): warm-up 2 epochs at batch 16 with weight
#: decay 0.01, stage 1 4 epochs and stage 2 3 epochs at batch 8. One table, read by the
#: Python API and by every CLI command alike, so the two cannot drift.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "warmup": {"epochs": 2, "batch_size": 16, "weight_decay": 0.01},
    "represent": {"epochs": 2, "batch_size": 8, "weight_decay": 0.0},
    "stage1": {"epochs": 4, "batch_size": 8, "weight_decay": 0.0},
    "stage2": {"epochs": 3, "batch_size": 8, "weight_decay": 0.0},
}


@dataclass
class TrainSettings(Config):
    """Optimisation settings shared by every stage (``None``: the stage's default)."""

    epochs: Optional[int] = setting(None, help="Passes over the records (default per stage: warmup 2, represent 2, stage1 4, stage2 3).", min=1)
    max_steps: Optional[int] = setting(None, help="Stop after this many optimizer steps.", min=1)
    batch_size: Optional[int] = setting(None, help="Records per micro-batch (default per stage: warmup 16, else 8).", min=1)
    grad_accum: int = setting(1, help="Micro-batches per optimizer step.", min=1)
    lr: Optional[float] = setting(None, help="Peak learning rate (default: warmup 1e-3, stage1 1e-3, stage2 5e-4).")
    weight_decay: Optional[float] = setting(None, help="AdamW weight decay (default per stage: warmup 0.01, else 0).")
    warmup_ratio: float = setting(0.03, help="Share of steps with a linear LR ramp.")
    max_grad_norm: float = setting(1.0, help="Gradient-norm clip.", cli=False)
    seed: int = setting(0, help="Seed of the data order and the fresh weights.")
    save_every: int = setting(200, help="Checkpoint every N optimizer steps (and at the end).", min=1)
    max_tokens: int = setting(1024, help="Text tokens kept per record (answers longer are cut).", min=16)
    group_by_length: bool = setting(
        True, help="Batch records of similar sequence length together (shuffled in spans of 50 batches): far less "
                   "padding, so each step costs less.")
    bf16: bool = setting(False, help="bf16 mixed precision (accelerate).")
    cpu: bool = setting(False, help="Train on the CPU even when a GPU is present.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "max_tokens", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def for_stage(self, stage: str) -> "TrainSettings":
        """A copy with the settings left ``None`` filled from :data:`STAGE_DEFAULTS`."""
        return replace(self, **{k: v for k, v in STAGE_DEFAULTS[stage].items() if getattr(self, k) is None})


@dataclass
class ConnectorChoice(Config):
    """The connector options a run sets; ``None`` keeps :class:`ConnectorConfig`'s default.

    "Not given" stays distinguishable from "given", so a run that starts from a checkpoint
    (``--init``) can tell which options the user meant to change. The widths are not here:
    they come from the encoder, the LLM and the features.
    """

    kind: Optional[str] = setting(None, help="'mlp' (default: every token plus pooled means) or 'qformer' (the paper's).",
                                  flag="--connector")
    num_queries: Optional[int] = setting(None, help="Q-Former queries (default 32).", flag="--queries")
    num_layers: Optional[int] = setting(None, help="Q-Former layers (default 4).", flag="--qformer-layers")
    hidden_size: Optional[int] = setting(None, help="Q-Former width (default 512).", flag="--qformer-hidden")
    num_heads: Optional[int] = setting(None, help="Q-Former attention heads (default 8).", flag="--qformer-heads")
    intermediate_size: Optional[int] = setting(None, help="Q-Former feed-forward width (default 2048).", flag="--qformer-ffn")
    dropout: Optional[float] = setting(None, help="Connector dropout (default 0.1).", flag="--connector-dropout")
    use_global: Optional[bool] = setting(None, help="Let the connector read the global token (default on).", flag="--global")
    use_patches: Optional[bool] = setting(
        None, help="Let the connector read the patch features under the question's box too (default on).", flag="--patches")
    use_summaries: Optional[bool] = setting(
        None, help="Let the connector read the encoder's tokens (default on); off reads the patch features alone "
                   "(the no-slide-encoder ablation).", flag="--summaries")
    max_patches: Optional[int] = setting(
        None, help="Patch features per question at most; more are thinned evenly (default 1024).", min=1)
    pooled_tokens: Optional[bool] = setting(
        None, help="MLP connector: also pass the mean of its outputs over the summaries and over the patches "
                   "(default on for the MLP connector).")
    patch_scaling: Optional[str] = setting(
        None, help="Standardise patch features per dimension ('per_dim', default) or with one shared scale ('shared'). "
                   "A run continuing an older 'shared' checkpoint may switch it to 'per_dim'; its weights are converted.")
    positions: Optional[bool] = setting(
        None, help="Add to each summary token and patch its place in the tissue in view, so the LLM can tell where on "
                   "the slide each visual row lies (default off).")

    def given(self) -> dict[str, Any]:
        """The options that were set, as :class:`ConnectorConfig` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        # Only the options set, as run.json has always held them: a missing key reads back as None.
        return self.given()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "ConnectorChoice":
        widths = {"vision_dim", "llm_dim", "patch_dim"} & set(data)
        if widths:
            raise ConfigError(f"{source + ': ' if source else ''}connector widths come from the encoder, the LLM and "
                              f"the features; do not set {sorted(widths)}")
        return super().from_dict(data, source=source)


@dataclass
class TuneConfig(Config):
    """Everything that defines a run; two runs with equal configs train the same model.

    ``encoder`` is a topo-pack checkpoint folder; with ``encoder_init="random"`` only its
    architecture is used (the "no pretraining" ablation), and without a folder a
    default-size encoder is built from random weights. ``train`` settings left ``None``
    take the stage's default (:data:`STAGE_DEFAULTS`), filled in when the config is made,
    so ``run.json`` records what was run.
    """

    stage: str = setting(help="warmup, represent, stage1 or stage2 (the command).", cli=False)
    records: str = setting(help="VQA records (JSONL) to train on.")
    out: str = setting(help="Run folder: run.json, checkpoint/, summary.json.")
    train: TrainSettings = setting(help="Optimisation.", default_factory=TrainSettings)
    job: Optional[str] = setting(None, help="Feature job folder (from `slidevl preprocess`).")
    feature_encoder: Optional[str] = setting(None, help="Feature folder under <job>/features (default: the only one).")
    encoder: Optional[str] = setting(None, help="Topo-pack encoder folder (from `slidevl slidellm pretrain`).")
    encoder_init: str = setting("pretrained", help="'pretrained' loads the weights; 'random' keeps only the architecture (ablation).")
    train_encoder: bool = setting(False, help="Fine-tune the slide encoder too (no output cache; slower).")
    llm: Optional[str] = setting(None, help="Hugging Face causal-LM folder, or a `warmup` run folder.")
    llm_options: LLMLoadOptions = setting(help="How the LLM is loaded.", default_factory=LLMLoadOptions)
    init: Optional[str] = setting(
        None, help="A run to start from: a `represent` run for stage 1, a stage-1 run (or a stage-2 LoRA run to continue) "
                   "for stage 2; its connector settings are kept.")
    connector: ConnectorChoice = setting(help="Connector options.", default_factory=ConnectorChoice)
    lora: LoraSettings = setting(help="LoRA adapters (stage 2).", default_factory=LoraSettings)
    embedded_lm: EmbeddedLMConfig = setting(help="Embedded LM size (warm-up).", default_factory=EmbeddedLMConfig)
    vocab_size: int = setting(4096, help="BPE vocabulary size.", min=300)
    answer_style: str = setting(
        DEFAULT_ANSWER_STYLE,
        help="How choice answers are written: 'text' (the option texts, default), 'letter_text' (\"B. option text\") or 'letter'.")
    # Re-ordered every epoch (stages 1, 2 and the warm-up), so option order carries no answer.
    shuffle_options: bool = setting(True, help="Re-order choice options every epoch (default on).")
    # Other records' answers, so the LM cannot learn training answers by heart from the question text.
    blind_warmup: bool = setting(
        True, help="Warm-up pairs each question with another record's answer, so answers cannot be learnt from the text (default on).")
    # "lora" trains adapters (the paper; the only sane choice for a 7B model); "full" trains every
    # LLM weight, which suits the small embedded LM that was itself trained from scratch on this QA text.
    llm_tuning: str = setting("lora", help="'lora' (adapters, default) or 'full' (every LLM weight; for the small embedded LM).")

    def __post_init__(self) -> None:
        # Python callers may pass the nested groups as plain dicts, as run.json holds them.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping) and f.name in _GROUPS:
                setattr(self, f.name, _GROUPS[f.name].from_dict(value))
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        self.train = self.train.for_stage(self.stage)
        if self.stage == "represent" and self.connector.kind is None:
            # BLIP-2's representation stage exists for the Q-Former; no other connector has one.
            self.connector = replace(self.connector, kind="qformer")
        if self.answer_style not in ANSWER_STYLES:
            raise ConfigError(f"answer_style must be one of {ANSWER_STYLES}, got {self.answer_style!r}")
        if self.llm_tuning not in LLM_TUNING:
            raise ConfigError(f"llm_tuning must be one of {LLM_TUNING}, got {self.llm_tuning!r}")
        if self.llm_tuning == "full" and self.llm_options.load_in_4bit:
            raise ConfigError("a 4-bit LLM cannot be tuned in full; use llm_tuning='lora' (QLoRA) or drop load_in_4bit")
        if self.encoder_init not in ("pretrained", "random"):
            raise ConfigError(f"encoder_init must be 'pretrained' or 'random', got {self.encoder_init!r}")
        # Validate the connector choices now rather than after minutes of caching; with
        # --init the kind and widths come from the checkpoint, so prepare_stage checks them.
        if self.init is None:
            self.connector_config(1, 1, 1)

    def save(self, path: str | Path, *, tagged: bool = True) -> Path:
        """Write ``run.json``, tagged with the class: a later version then knows the defaults it was written under."""
        return super().save(path, tagged=tagged)

    @classmethod
    def load(cls, path: str | Path) -> "TuneConfig":
        """Read ``run.json``; one written before the tag keeps the connector it meant (:func:`_untagged_run`)."""
        data = read_mapping(path)
        return cls.from_dict(data if CLASS_KEY in data else _untagged_run(data), source=str(path))

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.stage]

    def connector_config(self, vision_dim: int, llm_dim: int, patch_dim: int) -> ConnectorConfig:
        """The connector's config; ``patch_dim`` is used only when the connector reads patches."""
        config = ConnectorConfig(vision_dim=vision_dim, llm_dim=llm_dim, **self.connector.given())
        return replace(config, patch_dim=patch_dim if config.use_patches else 0)


_GROUPS: dict[str, type[Config]] = {
    "train": TrainSettings, "llm_options": LLMLoadOptions, "connector": ConnectorChoice, "lora": LoraSettings,
    "embedded_lm": EmbeddedLMConfig,
}



def _untagged_run(data: dict[str, Any]) -> dict[str, Any]:
    """A run file written before run files were tagged, with the connector defaults of its time.

    For most of that time an unnamed connector was the Q-Former, and the MLP connector
    pooled nothing (``pooled_tokens`` did not exist, then was off). The defaults became the
    pooling MLP shortly before the tag; a file of that short span that left them unnamed
    reads with the older ones, and ``--resume`` then lists the difference to add as options.
    Only stages 1 and 2 without ``--init`` chose a connector: with ``--init`` it came from
    the checkpoint, and the other stages had none.
    """
    if data.get("stage") not in ("stage1", "stage2") or data.get("init") is not None:
        return data
    connector = data.get("connector")
    if connector is not None and not isinstance(connector, Mapping):
        return data  # from_dict reports the malformed group
    return {**data, "connector": {"kind": "qformer", "pooled_tokens": False, **(connector or {})}}
