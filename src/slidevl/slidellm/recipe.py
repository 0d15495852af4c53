"""The whole slide-VQA training recipe on one feature job, as one resumable call.

    topo-pack encoder: MAE (patches, then packs) -> MoCo        (pretrain_encoder)
    embedded LM: tokenizer + language warm-up on the QA text    (stage "warmup")
    stage 1: connector on captions; stage 2: connector + LoRA   (stages "stage1", "stage2")

Each step is skipped when its folder already holds a finished run and resumed when it
holds an unfinished one, so an interrupted ``slidevl demo`` or benchmark continues where
it stopped. The CLI commands (``slidevl slidellm pretrain|warmup|stage1|stage2``) do the
same steps one by one, for runs that need other settings at each step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.tuning.stages import run_stage, run_warmup


@dataclass
class RecipeSizes:
    """What sets the cost of the recipe.

    The defaults are a short schedule that runs in minutes on a CPU; they show the whole
    path, not a converged model (see ``benchmarks/results/vqa_ablations.md``). ``encoder``
    overrides :class:`~slidevl.slidellm.encoder.TopoPackConfig` fields (the paper's
    6 layers x 512 by default) and ``connector`` the connector's.
    """

    mae_steps: int = 40
    moco_steps: int = 20
    warmup_epochs: int = 2
    stage1_epochs: int = 2
    stage2_epochs: int = 1
    batch_size: int = 8
    seed: int = 0
    encoder: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=dict)
    encoder_mask: str = "topo"


@dataclass(frozen=True)
class RecipeOutputs:
    """Folders of each step; ``stage2`` is the checkpoint that answers questions."""

    encoder: Path
    warmup: Path
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
        (run_warmup if cfg.stage == "warmup" else run_stage)(cfg, resume=resume)
    return json.loads(summary.read_text())


def train_vqa(job: Path, qa: Path, out: Path, sizes: RecipeSizes | None = None, *, progress: bool = True) -> RecipeOutputs:
    """Pretrain, warm up, and tune a slide VQA model on ``qa/train.jsonl`` over ``job``."""
    sizes = sizes or RecipeSizes()
    records = str(qa / "train.jsonl")
    encoder = pretrain_encoder(job, out / "encoder", mae_steps=sizes.mae_steps, moco_steps=sizes.moco_steps,
                               seed=sizes.seed, mask_variant=sizes.encoder_mask, encoder=sizes.encoder, progress=progress)

    def train(epochs: int, **extra: Any) -> dict[str, Any]:
        return dict(epochs=epochs, batch_size=sizes.batch_size, seed=sizes.seed, save_every=10_000, **extra)

    summaries = {
        "warmup": run_stage_once(TuneConfig.from_dict(dict(
            stage="warmup", records=records, out=str(out / "warmup"),
            train=train(sizes.warmup_epochs, weight_decay=0.01)))),
    }
    common = dict(records=records, job=str(job), encoder=str(encoder))
    summaries["stage1"] = run_stage_once(TuneConfig.from_dict(dict(
        stage="stage1", out=str(out / "stage1"), llm=str(out / "warmup"), connector=dict(sizes.connector),
        train=train(sizes.stage1_epochs), **common)))
    summaries["stage2"] = run_stage_once(TuneConfig.from_dict(dict(
        stage="stage2", out=str(out / "stage2"), init=str(out / "stage1"), train=train(sizes.stage2_epochs), **common)))
    return RecipeOutputs(encoder=encoder, warmup=out / "warmup", stage1=out / "stage1", stage2=out / "stage2",
                         summaries=summaries)

