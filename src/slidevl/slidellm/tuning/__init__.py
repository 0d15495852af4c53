"""Tuning of the slide LLM: language warm-up (embedded LLM), stage 1 (connector), stage 2 (connector + LoRA).

Typical use::

    from slidevl.slidellm.tuning.config import TuneConfig
    from slidevl.slidellm.tuning.stages import run_stage, run_warmup

    run_warmup(TuneConfig(stage="warmup", records="qa/train.jsonl", out="runs/warmup"))
    run_stage(TuneConfig(stage="stage1", records="qa/train.jsonl", out="runs/s1", llm="runs/warmup",
                         job="job", encoder="encoders/topo"))
    run_stage(TuneConfig(stage="stage2", records="qa/train.jsonl", out="runs/s2", init="runs/s1"))

The package itself imports nothing, so mounting its command line stays fast.
"""
