"""One entry point for every tuning stage: the stage a config names, run (or resumed)."""

from __future__ import annotations

from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.tuning.loop import LoopResult


def run_tuning(cfg: TuneConfig, *, resume: bool = False) -> LoopResult:
    """Run ``cfg.stage``: the language warm-up, the representation stage, or stage 1 or 2."""
    from slidevl.slidellm.tuning.represent import run_represent
    from slidevl.slidellm.tuning.stages import run_stage, run_warmup

    runner = {"warmup": run_warmup, "represent": run_represent}.get(cfg.stage, run_stage)
    return runner(cfg, resume=resume)
