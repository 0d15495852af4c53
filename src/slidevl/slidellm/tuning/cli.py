"""``slidevl slidellm warmup|stage1|stage2``: tune the slide LLM from the command line.

Each command builds a :class:`~slidevl.slidellm.tuning.config.TuneConfig` (nested
settings as plain dicts, so every validation error is reported the same way) and calls
:func:`~slidevl.slidellm.tuning.stages.run_warmup` or :func:`~.stages.run_stage`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console

from slidevl.slidellm.answers import DEFAULT_ANSWER_STYLE

app = typer.Typer(help="Tune the slide LLM: language warm-up, stage 1 (connector), stage 2 (connector + LoRA).", no_args_is_help=True)
_err = Console(stderr=True)

Records = Annotated[Path, typer.Option("--records", help="VQA records (JSONL) to train on.")]
Out = Annotated[Path, typer.Option("--out", help="Run folder: run.json, checkpoint/, summary.json.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Job = Annotated[Optional[Path], typer.Option("--job", help="Feature job folder (from `slidevl preprocess`).")]
FeatureEnc = Annotated[Optional[str], typer.Option("--feature-encoder", help="Feature folder under <job>/features (default: the only one).")]
Encoder = Annotated[Optional[Path], typer.Option("--encoder", help="Topo-pack encoder folder (from `slidevl slidellm pretrain`).")]
EncoderInit = Annotated[str, typer.Option("--encoder-init", help="'pretrained' loads the weights; 'random' keeps only the architecture (ablation).")]
TrainEncoder = Annotated[bool, typer.Option("--train-encoder", help="Fine-tune the slide encoder too (no output cache; slower).")]
LLM = Annotated[Optional[Path], typer.Option("--llm", help="Hugging Face causal-LM folder, or a `warmup` run folder.")]
Connector = Annotated[Optional[str], typer.Option("--connector", help="'qformer' (default) or 'mlp' (all tokens, ablation).")]
Queries = Annotated[Optional[int], typer.Option("--queries", help="Q-Former queries (default 32).")]
QLayers = Annotated[Optional[int], typer.Option("--qformer-layers", help="Q-Former layers (default 4).")]
QHidden = Annotated[Optional[int], typer.Option("--qformer-hidden", help="Q-Former width (default 512).")]
QHeads = Annotated[Optional[int], typer.Option("--qformer-heads", help="Q-Former attention heads (default 8).")]
QFfn = Annotated[Optional[int], typer.Option("--qformer-ffn", help="Q-Former feed-forward width (default 2048).")]
QDropout = Annotated[Optional[float], typer.Option("--connector-dropout", help="Connector dropout (default 0.1).")]
UseGlobal = Annotated[Optional[bool], typer.Option("--global/--no-global", help="Let the connector read the global token (default on).")]
UsePatches = Annotated[Optional[bool], typer.Option(
    "--patches/--no-patches", help="Let the connector read the patch features under the question's box too (default on).")]
MaxPatches = Annotated[Optional[int], typer.Option(
    "--max-patches", min=1, help="Patch features per question at most; more are thinned evenly (default 1024).")]
PooledTokens = Annotated[Optional[bool], typer.Option(
    "--pooled-tokens/--no-pooled-tokens",
    help="MLP connector: also pass the mean of its outputs over the summaries and over the patches (default off).")]
PatchScaling = Annotated[Optional[str], typer.Option(
    "--patch-scaling",
    help="Standardise patch features per dimension ('per_dim', default) or with one shared scale ('shared'). "
         "A run continuing an older 'shared' checkpoint may switch it to 'per_dim'; its weights are converted.")]
Epochs = Annotated[int, typer.Option("--epochs", min=1)]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Records per micro-batch.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")]
LR = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: warmup 1e-3, stage1 1e-3, stage2 5e-4).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay")]
WarmupRatio = Annotated[float, typer.Option("--warmup-ratio", help="Share of steps with a linear LR ramp.")]
Seed = Annotated[int, typer.Option("--seed")]
SaveEvery = Annotated[int, typer.Option("--save-every", min=1, help="Checkpoint every N optimizer steps (and at the end).")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=16, help="Text tokens kept per record (answers longer are cut).")]
BF16 = Annotated[bool, typer.Option("--bf16", help="bf16 mixed precision (accelerate).")]
CPU = Annotated[bool, typer.Option("--cpu", help="Train on the CPU even when a GPU is present.")]
DType = Annotated[str, typer.Option("--llm-dtype", help="Weights dtype of the LLM: float32, bfloat16 or float16.")]
FourBit = Annotated[bool, typer.Option("--load-in-4bit", help="Load the LLM in 4-bit (bitsandbytes, CUDA).")]
AnswerStyle = Annotated[str, typer.Option(
    "--answer-style", help="How choice answers are written: 'text' (the option texts, default), 'letter_text' (\"B. option text\") or 'letter'.")]
ShuffleOptions = Annotated[bool, typer.Option(
    "--shuffle-options/--no-shuffle-options", help="Re-order choice options every epoch (default on).")]
BlindWarmup = Annotated[bool, typer.Option(
    "--blind-warmup/--no-blind-warmup",
    help="Warm-up pairs each question with another record's answer, so answers cannot be learnt from the text (default on).")]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for LLM activation memory.")]


def _fail(message: str) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


_CONNECTOR_OPTIONS = ("connector", "queries", "qformer_layers", "qformer_hidden", "qformer_heads", "qformer_ffn",
                      "connector_dropout", "use_global", "use_patches", "max_patches", "pooled_tokens", "patch_scaling")
_TRAIN_OPTIONS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "seed",
                  "save_every", "max_tokens", "bf16", "cpu")


def _connector(**kwargs: Any) -> dict[str, Any]:
    # Only options given on the command line: the rest keep ConnectorConfig's defaults,
    # and a stage-2 --init run can tell "not given" from "given".
    names = {"connector": "kind", "queries": "num_queries", "qformer_layers": "num_layers", "qformer_hidden": "hidden_size",
             "qformer_heads": "num_heads", "qformer_ffn": "intermediate_size", "connector_dropout": "dropout", "use_global": "use_global",
             "use_patches": "use_patches", "max_patches": "max_patches", "pooled_tokens": "pooled_tokens",
             "patch_scaling": "patch_scaling"}
    return {names[k]: v for k, v in kwargs.items() if v is not None}


def _stage_config(stage: str, p: dict[str, Any]) -> dict[str, Any]:
    """The run config of stage 1 or 2 from the command's parameters (its ``locals()``)."""
    def path(key: str) -> str | None:
        return None if p[key] is None else str(p[key])

    return dict(
        stage=stage,
        records=str(p["records"]),
        out=str(p["out"]),
        llm=path("llm"),
        job=path("job"),
        feature_encoder=p["feature_encoder"],
        encoder=path("encoder"),
        encoder_init=p["encoder_init"],
        train_encoder=p["train_encoder"],
        answer_style=p["answer_style"],
        shuffle_options=p["shuffle_options"],
        connector=_connector(**{k: p[k] for k in _CONNECTOR_OPTIONS}),
        llm_options=dict(dtype=p["llm_dtype"], load_in_4bit=p["load_in_4bit"], gradient_checkpointing=p["gradient_checkpointing"]),
        train={k: p[k] for k in _TRAIN_OPTIONS},
    )


def _run(cfg_kwargs: dict[str, Any], resume: bool) -> None:
    from transformers.utils import logging as hf_logging

    from slidevl.features.store import FeatureStoreError
    from slidevl.slidellm.llm import LLMError
    from slidevl.slidellm.model import SlideVLMError
    from slidevl.slidellm.tokenizer import TokenizerError
    from slidevl.slidellm.tuning.config import TuneConfig
    from slidevl.slidellm.tuning.stages import run_stage, run_warmup
    from slidevl.slidellm.tuning.state import CheckpointError
    from slidevl.vqa.records import VQARecordError

    hf_logging.disable_progress_bar()
    try:
        cfg = TuneConfig.from_dict(cfg_kwargs)
        runner = run_warmup if cfg.stage == "warmup" else run_stage
        result = runner(cfg, resume=resume)
    except (ValueError, CheckpointError, FeatureStoreError, LLMError, SlideVLMError, TokenizerError, VQARecordError, FileNotFoundError) as exc:
        _fail(str(exc))
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    Console().print(f"[bold]{cfg.stage}[/]: {result.steps} steps, final loss {loss} -> {Path(cfg.out) / 'checkpoint'}")


@app.command("warmup")
def warmup_command(
    records: Records,
    out: Out,
    resume: Resume = False,
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=300, help="BPE vocabulary size.")] = 4096,
    hidden: Annotated[int, typer.Option("--lm-hidden", help="Embedded LM width.")] = 256,
    layers: Annotated[int, typer.Option("--lm-layers", help="Embedded LM layers.")] = 4,
    heads: Annotated[int, typer.Option("--lm-heads", help="Embedded LM attention heads.")] = 4,
    ffn: Annotated[int, typer.Option("--lm-ffn", help="Embedded LM feed-forward width.")] = 688,
    epochs: Epochs = 20,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 16,
    grad_accum: GradAccum = 1,
    lr: LR = None,
    weight_decay: WeightDecay = 0.01,
    warmup_ratio: WarmupRatio = 0.03,
    seed: Seed = 0,
    save_every: SaveEvery = 200,
    max_tokens: MaxTokens = 1024,
    bf16: BF16 = False,
    cpu: CPU = False,
    answer_style: AnswerStyle = DEFAULT_ANSWER_STYLE,
    shuffle_options: ShuffleOptions = True,
    blind_warmup: BlindWarmup = True,
) -> None:
    """Stage 0 for the embedded default LLM: train a tokenizer and a small LM on the QA text alone.

    Its output folder is passed to `stage1 --llm`; a pretrained chat LLM skips this stage.
    """
    _run(
        dict(
            stage="warmup",
            records=str(records),
            out=str(out),
            vocab_size=vocab_size,
            answer_style=answer_style,
            shuffle_options=shuffle_options,
            blind_warmup=blind_warmup,
            embedded_lm=dict(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn),
            train=dict(epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                         weight_decay=weight_decay, warmup_ratio=warmup_ratio, seed=seed, save_every=save_every,
                         max_tokens=max_tokens, bf16=bf16, cpu=cpu),
        ),
        resume,
    )


@app.command("stage1")
def stage1_command(
    records: Records,
    out: Out,
    llm: LLM = None,
    job: Job = None,
    resume: Resume = False,
    feature_encoder: FeatureEnc = None,
    encoder: Encoder = None,
    encoder_init: EncoderInit = "pretrained",
    train_encoder: TrainEncoder = False,
    connector: Connector = None,
    queries: Queries = None,
    qformer_layers: QLayers = None,
    qformer_hidden: QHidden = None,
    qformer_heads: QHeads = None,
    qformer_ffn: QFfn = None,
    connector_dropout: QDropout = None,
    use_global: UseGlobal = None,
    use_patches: UsePatches = None,
    max_patches: MaxPatches = None,
    pooled_tokens: PooledTokens = None,
    patch_scaling: PatchScaling = None,
    epochs: Epochs = 5,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    lr: LR = None,
    weight_decay: WeightDecay = 0.0,
    warmup_ratio: WarmupRatio = 0.03,
    seed: Seed = 0,
    save_every: SaveEvery = 200,
    max_tokens: MaxTokens = 1024,
    bf16: BF16 = False,
    cpu: CPU = False,
    llm_dtype: DType = "float32",
    load_in_4bit: FourBit = False,
    gradient_checkpointing: GradCkpt = False,
    answer_style: AnswerStyle = DEFAULT_ANSWER_STYLE,
    shuffle_options: ShuffleOptions = True,
) -> None:
    """Stage 1: align the connector on caption records; the encoder and the LLM stay frozen."""
    _run(_stage_config("stage1", locals()), resume)


@app.command("stage2")
def stage2_command(
    records: Records,
    out: Out,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Stage-1 run to start from (omit for one-stage tuning), or a stage-2 LoRA run to continue."
    )] = None,
    llm: LLM = None,
    job: Job = None,
    resume: Resume = False,
    feature_encoder: FeatureEnc = None,
    encoder: Encoder = None,
    encoder_init: EncoderInit = "pretrained",
    train_encoder: TrainEncoder = False,
    connector: Connector = None,
    queries: Queries = None,
    qformer_layers: QLayers = None,
    qformer_hidden: QHidden = None,
    qformer_heads: QHeads = None,
    qformer_ffn: QFfn = None,
    connector_dropout: QDropout = None,
    use_global: UseGlobal = None,
    use_patches: UsePatches = None,
    max_patches: MaxPatches = None,
    pooled_tokens: PooledTokens = None,
    patch_scaling: PatchScaling = None,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1)] = 128,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", min=1)] = 256,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout")] = 0.05,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="'all-linear' or comma-separated module names.")] = "all-linear",
    llm_tuning: Annotated[str, typer.Option(
        "--llm-tuning", help="'lora' (adapters, default) or 'full' (every LLM weight; for the small embedded LM).")] = "lora",
    epochs: Epochs = 5,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    lr: LR = None,
    weight_decay: WeightDecay = 0.0,
    warmup_ratio: WarmupRatio = 0.03,
    seed: Seed = 0,
    save_every: SaveEvery = 200,
    max_tokens: MaxTokens = 1024,
    bf16: BF16 = False,
    cpu: CPU = False,
    llm_dtype: DType = "float32",
    load_in_4bit: FourBit = False,
    gradient_checkpointing: GradCkpt = False,
    answer_style: AnswerStyle = DEFAULT_ANSWER_STYLE,
    shuffle_options: ShuffleOptions = True,
) -> None:
    """Stage 2: train the connector and LoRA adapters on single/multi/open VQA records."""
    targets: str | list[str] = lora_targets if lora_targets == "all-linear" else [t.strip() for t in lora_targets.split(",") if t.strip()]
    config = _stage_config("stage2", locals())
    config["init"] = None if init is None else str(init)  # stage 2 only: a stage-1 run to start from
    config["lora"] = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
    config["llm_tuning"] = llm_tuning
    _run(config, resume)

