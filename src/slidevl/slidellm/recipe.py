"""The whole slide-VQA training recipe on one feature job, as one resumable call.

    topo-pack encoder: MAE (patches, then packs) -> MoCo        (pretrain_encoder)
    embedded LM: tokenizer + language warm-up on the QA text    (stage "warmup")
    Q-Former: ITC + ITM + ITG on captions (BLIP-2)              (stage "represent", Q-Former only)
    stage 1: connector on captions; stage 2: connector + LoRA   (stages "stage1", "stage2")

Each step is skipped when its folder already holds a finished run and resumed when it
holds an unfinished one, so an interrupted ``slidevl demo`` or benchmark continues where
it stopped. The CLI commands (``slidevl slidellm pretrain|warmup|represent|stage1|stage2``) do
the same steps one by one, for runs that need other settings at each step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidevl.slidellm.connector import ConnectorConfig
from slidevl.config import Config, setting
from slidevl.slidellm.tuning.config import ConnectorChoice, TuneConfig
from slidevl.slidellm.tuning.runner import run_tuning


@dataclass
class RecipeSizes(Config):
    """The VQA training recipe; its defaults are the best measured one (``recipes/vqa.yaml``).

    That is the run of ``benchmarks/results/vqa_ss_fresh_3ep.md`` (0.905 single-choice
    accuracy, 0.858 overall): 80 MAE + 40 MoCo encoder steps, a 2-epoch language warm-up,
    the MLP connector with pooled tokens (:class:`ConnectorConfig`'s default), 4 epochs of
    stage 1 and 3 of stage 2 at batch 8, on a QA set built with the extra training data
    (``slidevl vqa build`` defaults) and answered with ``rank_single`` (``slidevl vqa
    predict``'s default). The epochs and batch are the tuning stages' own defaults
    (:data:`~slidevl.slidellm.tuning.config.STAGE_DEFAULTS`); a test keeps the two equal.
    ``recipes/demo.yaml`` is the same recipe at the demo's size.

    ``represent_epochs`` of BLIP-2's representation stage come before stage 1 when the
    connector is a Q-Former (0 skips it; an MLP connector has no such stage).
    """

    mae_steps: int = setting(80, help="MAE steps of the topo-pack encoder pretraining.", min=1)
    moco_steps: int = setting(40, help="MoCo steps after MAE.", min=0)
    warmup_epochs: int = setting(2, help="Epochs of the language warm-up (batch and weight decay: the warm-up's defaults).", min=1)
    represent_epochs: int = setting(1, help="Epochs of the representation stage (Q-Former connectors only; 0 skips it).", min=0)
    stage1_epochs: int = setting(4, help="Epochs of stage 1 (connector alignment).", min=1)
    stage2_epochs: int = setting(3, help="Epochs of stage 2 (connector + LoRA).", min=1)
    batch_size: int = setting(8, help="Records per micro-batch in the representation stage and stages 1 and 2.", min=1)
    seed: int = setting(0, help="Seed of every step.")
    encoder: dict[str, Any] = setting(help="TopoPackConfig overrides (sizes, attention implementation).", default_factory=dict,
                                      cli=False)
    connector: ConnectorChoice = setting(help="Connector options.", default_factory=ConnectorChoice)
    encoder_mask: str = setting("topo", help="Attention mask of the encoder: topo, patch_sees_summary or dense.")

    def __post_init__(self) -> None:
        if not isinstance(self.connector, ConnectorChoice):  # a plain dict from Python callers
            self.connector = ConnectorChoice.from_dict(self.connector)


@dataclass(frozen=True)
class RecipeOutputs:
    """Folders of each step; ``stage2`` is the checkpoint that answers questions (``represent``: None when skipped)."""

    encoder: Path
    warmup: Path
    represent: Path | None
    stage1: Path
    stage2: Path
    summaries: dict[str, dict[str, Any]]


def pretrain_encoder(job: Path, folder: Path, *, mae_steps: int, moco_steps: int, seed: int = 0,
                     mask_variant: str = "topo", encoder: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """MAE -> MoCo pretraining of a topo-pack encoder on ``job``'s features, resumable.

    ``encoder`` overrides fields of the encoder config (sizes, attention implementation).
    """
    from slidevl.slidellm.pretrain import FeatureStoreSource, PretrainConfig, pretrain
    from slidevl.slidellm.pretrain.checkpoint import has_checkpoint, load_checkpoint
    from slidevl.slidellm.pretrain.data import encoder_config_for

    config = PretrainConfig(mae_steps=mae_steps, moco_steps=moco_steps, seed=seed,
                            warmup_steps=max(1, (mae_steps + moco_steps) // 20))
    started = has_checkpoint(folder)
    if started and load_checkpoint(folder).step >= config.total_steps:
        return folder
    source = FeatureStoreSource(job)
    encoder_config = encoder_config_for(source, mask_variant=mask_variant, **(encoder or {}))
    pretrain(source, folder, config=config, encoder_config=encoder_config, resume=started, progress=progress)
    return folder


def run_stage_once(cfg: TuneConfig) -> dict[str, Any]:
    """Run a tuning stage unless its folder holds a finished run; return its ``summary.json``."""
    out = Path(cfg.out)
    summary = out / "summary.json"
    if not summary.is_file():
        resume = (out / "checkpoint").is_dir()
        run_tuning(cfg, resume=resume)
    return json.loads(summary.read_text())


def train_vqa(job: Path, qa: Path, out: Path, sizes: RecipeSizes | None = None, *, progress: bool = True) -> RecipeOutputs:
    """Pretrain, warm up, and tune a slide VQA model on ``qa/train.jsonl`` over ``job``."""
    sizes = sizes or RecipeSizes()
    records = str(qa / "train.jsonl")
    encoder = pretrain_encoder(job, out / "encoder", mae_steps=sizes.mae_steps, moco_steps=sizes.moco_steps,
                               seed=sizes.seed, mask_variant=sizes.encoder_mask, encoder=sizes.encoder, progress=progress)

    def train(epochs: int, **extra: Any) -> dict[str, Any]:
        return dict(epochs=epochs, seed=sizes.seed, save_every=10_000, **extra)

    summaries = {
        "warmup": run_stage_once(TuneConfig.from_dict(dict(
            stage="warmup", records=records, out=str(out / "warmup"), train=train(sizes.warmup_epochs)))),
    }
    common = dict(records=records, job=str(job), encoder=str(encoder))
    represent = None
    # The connector's own default decides when the sizes do not name a kind.
    qformer = ConnectorConfig(vision_dim=1, llm_dim=1, **sizes.connector.given()).kind == "qformer"
    if qformer and sizes.represent_epochs > 0:
        represent = out / "represent"
        summaries["represent"] = run_stage_once(TuneConfig.from_dict(dict(
            stage="represent", out=str(represent), llm=str(out / "warmup"), connector=sizes.connector,
            train=train(sizes.represent_epochs, batch_size=sizes.batch_size), **common)))
    # Started from the representation stage, stage 1 keeps its connector settings.
    start = dict(init=str(represent)) if represent else dict(llm=str(out / "warmup"), connector=sizes.connector)
    summaries["stage1"] = run_stage_once(TuneConfig.from_dict(dict(
        stage="stage1", out=str(out / "stage1"), train=train(sizes.stage1_epochs, batch_size=sizes.batch_size), **start, **common)))
    summaries["stage2"] = run_stage_once(TuneConfig.from_dict(dict(
        stage="stage2", out=str(out / "stage2"), init=str(out / "stage1"), train=train(sizes.stage2_epochs, batch_size=sizes.batch_size), **common)))
    return RecipeOutputs(encoder=encoder, warmup=out / "warmup", represent=represent, stage1=out / "stage1",
                         stage2=out / "stage2", summaries=summaries)

