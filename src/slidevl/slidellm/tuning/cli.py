"""``slidevl slidellm warmup|represent|stage1|stage2``: tune the slide LLM from the command line.

Each command's options are generated from
:class:`~slidevl.slidellm.tuning.config.TuneConfig` (:func:`~slidevl.cli_config.options_from`),
so they have the Python API's defaults and help; ``--recipe FILE`` reads settings from a
YAML/JSON file. The command calls :func:`~slidevl.slidellm.tuning.runner.run_tuning`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slidevl.cli_config import options_from
from slidevl.cli_errors import ReportingGroup
from slidevl.ranks import is_main_process
from slidevl.slidellm.tuning.config import TuneConfig

app = typer.Typer(cls=ReportingGroup, help="Tune the slide LLM: language warm-up, stage 1 (connector), stage 2 (connector + LoRA).", no_args_is_help=True)
_err = Console(stderr=True)

Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the run in --out from its last checkpoint (a stopped run continues without it too).")]

#: Options of each stage: every TuneConfig field but those the stage does not read.
_NOT_WARMUP = ("job", "feature_encoder", "encoder", "encoder_init", "train_encoder", "llm", "llm_options", "init",
               "connector", "lora", "llm_tuning")
_NOT_TUNING = ("embedded_lm", "vocab_size", "blind_warmup")
_NOT_REPRESENT = (*_NOT_TUNING, "init", "train_encoder", "connector.pooled_tokens", "llm_options", "answer_style",
                  "shuffle_options", "lora", "llm_tuning")


def _run(cfg: TuneConfig, resume: bool) -> None:
    from transformers.utils import logging as hf_logging

    from slidevl.interrupts import resumable
    from slidevl.slidellm.tuning.loop import describe_checkpoint, unfinished_run
    from slidevl.slidellm.tuning.runner import run_tuning

    hf_logging.disable_progress_bar()
    out = Path(cfg.out)
    # The command that was stopped, run again, continues from its last checkpoint.
    if not resume and unfinished_run(out):
        resume = True
        if is_main_process():
            _err.print(f"resuming: {describe_checkpoint(out)}", highlight=False)
    with resumable(lambda: describe_checkpoint(out), console=_err):
        result = run_tuning(cfg, resume=resume)
    if is_main_process():
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        Console().print(f"[bold]{cfg.stage}[/]: {result.steps} steps, final loss {loss} -> {out / 'checkpoint'}")


@app.command("warmup")
@options_from(TuneConfig, exclude=_NOT_WARMUP, fixed={"stage": "warmup"})
def warmup_command(config: TuneConfig, resume: Resume = False) -> None:
    """Stage 0 for the embedded default LLM: train a tokenizer and a small LM on the QA text alone.

    Its output folder is passed to `stage1 --llm`; a pretrained chat LLM skips this stage.
    """
    _run(config, resume)


@app.command("represent")
@options_from(TuneConfig, exclude=_NOT_REPRESENT, fixed={"stage": "represent"})
def represent_command(config: TuneConfig, resume: Resume = False) -> None:
    """Representation stage (BLIP-2): train the Q-Former on caption records with contrastive, matching and
    generative losses, before stage 1 (`stage1 --init <this run>`). The LLM is not loaded; its tokenizer and width are used."""
    _run(config, resume)


@app.command("stage1")
@options_from(TuneConfig, exclude=(*_NOT_TUNING, "lora", "llm_tuning"), fixed={"stage": "stage1"})
def stage1_command(config: TuneConfig, resume: Resume = False) -> None:
    """Stage 1: align the connector on caption records; the encoder and the LLM stay frozen."""
    _run(config, resume)


@app.command("stage2")
@options_from(TuneConfig, exclude=_NOT_TUNING, fixed={"stage": "stage2"})
def stage2_command(config: TuneConfig, resume: Resume = False) -> None:
    """Stage 2: train the connector and LoRA adapters on single/multi/open VQA records."""
    _run(config, resume)
