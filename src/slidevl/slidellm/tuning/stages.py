"""The tuning stages as Python functions (the CLI is a thin layer over these).

* ``warmup`` (stage 0, embedded LLM only): trains a byte-level BPE tokenizer and the
  small from-scratch causal LM on the QA text alone (every token of each chat is a
  target). A pretrained LLM skips this stage. Its output, ``<run>/checkpoint/llm``, is an
  ordinary Hugging Face model folder that stages 1 and 2 load exactly as they would
  load a downloaded 7B chat model, so "LLM frozen" in stage 1 means the same thing for
  both.
* ``stage1``: caption records; only the connector trains (encoder and LLM frozen).
* ``stage2``: single/multi/open records; connector + LoRA adapters train (or, with
  ``llm_tuning="full"``, connector + every LLM weight). It starts from a stage-1
  checkpoint (``init``) or, for the one-stage ablation, from scratch. A stage-2 LoRA
  checkpoint as ``init`` continues its adapters (their LoRA settings win over ``lora``).

The topo-pack encoder is frozen unless ``train_encoder`` is set; frozen outputs are
computed once per slide and cached (:mod:`slidevl.slidellm.tuning.visual`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
import torch
from torch import Tensor, nn

from slidevl.errors import CheckpointError, InputError
from slidevl.features.store import FeatureStore
from slidevl.ranks import is_main_process
from slidevl.slidellm.connector import CONVERTIBLE_OPTIONS, READ_OPTIONS, build_connector
from slidevl.slidellm.encoder import TopoPackConfig, TopoPackEncoder, load_encoder
from slidevl.slidellm.encoder.io import CONFIG_NAME
from slidevl.slidellm.checkpoint_layout import CHECKPOINT_DIR, LLM_DIR, CheckpointFolder, load_checkpoint_encoder, open_checkpoint
from slidevl.slidellm.llm import add_lora, build_embedded_llm, freeze, load_llm, load_lora
from slidevl.slidellm.model import SlideVLM
from slidevl.slidellm.tokenizer import image_token_id, load_tokenizer, train_tokenizer
from slidevl.slidellm.tuning.checkpoint import resolve_llm_dir
from slidevl.slidellm.tuning.state import load_tensors, state_part
from slidevl.slidellm.vlm_config import LLMSettings, SlideVLMConfig
from slidevl.qa.records import read_records
from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.tuning.loop import LoopResult, make_accelerator, run_loop
from slidevl.slidellm.tuning.visual import CachedVisuals, LiveVisuals, check_regions
from slidevl.slidellm.vqa_data import ChatBatch, ChatCollator, ChatDataset, corpus_texts, select_records

#: Folder inside a run where frozen-encoder outputs are cached (the feature job is only read).
CACHE_DIR = "visual_cache"


class TuningModule(nn.Module):
    """What the optimiser sees: the slide LLM, plus the encoder when it trains too."""

    def __init__(self, vlm: SlideVLM, visuals: CachedVisuals | LiveVisuals, encoder: TopoPackEncoder | None) -> None:
        super().__init__()
        self.vlm = vlm
        # Registered only when trainable, so a frozen encoder stays out of DDP and the optimiser.
        self.encoder = encoder
        self.visuals = visuals

    def forward(self, batch: ChatBatch) -> Tensor:
        device = next(self.vlm.connector.parameters()).device
        batch = batch.to(device)
        slides = {s: self.visuals.get(s) for s in dict.fromkeys(batch.slides)}
        tokens = [self.vlm.visual_input(slides[s], bbox).to(device) for s, bbox in zip(batch.slides, batch.bboxes)]
        return self.vlm(batch.input_ids, batch.attention_mask, batch.labels, tokens)


@dataclass
class PreparedRun:
    """A stage ready to train: :meth:`run` starts (or resumes) the loop."""

    cfg: TuneConfig
    run_dir: Path
    resume: bool
    accelerator: Accelerator
    module: nn.Module
    dataset: ChatDataset
    collate: ChatCollator
    loss_fn: Callable[[nn.Module, ChatBatch], Tensor]
    save_model: Callable[[Path, dict[str, Tensor]], None]
    device_placement: bool = True
    #: Each record's sequence length, for length-grouped batches (None: not grouped).
    lengths: list[int] | None = None

    def run(self) -> LoopResult:
        return run_loop(
            accelerator=self.accelerator,
            module=self.module,
            dataset=self.dataset,
            collate=self.collate,
            loss_fn=self.loss_fn,
            settings=self.cfg.train,
            lr=self.cfg.lr,
            run_dir=self.run_dir,
            save_model=self.save_model,
            resume=self.resume,
            description=self.cfg.stage,
            device_placement=self.device_placement,
            lengths=self.lengths,
        )


def _prepare_run_dir(cfg: TuneConfig, resume: bool) -> Path:
    run_dir = Path(cfg.out)
    run_json = run_dir / "run.json"
    if resume:
        if not run_json.is_file():
            raise CheckpointError(f"{run_dir}: no run.json; there is no run to resume here (drop --resume)")
        diffs = TuneConfig.load(run_json).differences(cfg)
        if diffs:
            raise CheckpointError(
                f"{run_dir}: --resume needs the options the run started with; differences:\n  " + "\n  ".join(diffs)
            )
        if not (run_dir / CHECKPOINT_DIR).is_dir():
            raise CheckpointError(f"{run_dir}: the run has no checkpoint yet; start it again without --resume")
    elif (run_dir / CHECKPOINT_DIR).exists():
        raise CheckpointError(f"{run_dir}: already holds a checkpoint; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # every process of a launch checks the folder; one writes
        cfg.save(run_json)
    return run_dir


def run_warmup(cfg: TuneConfig, *, resume: bool = False) -> LoopResult:
    """Stage 0: tokenizer + embedded LLM trained on the QA text; writes ``<out>/checkpoint/llm``."""
    return prepare_warmup(cfg, resume=resume).run()


def prepare_warmup(cfg: TuneConfig, *, resume: bool = False) -> PreparedRun:
    """Build the warm-up's tokenizer, model and data, up to the first step."""
    if cfg.stage != "warmup":
        raise ValueError(f"run_warmup needs stage 'warmup', got {cfg.stage!r}")
    run_dir = _prepare_run_dir(cfg, resume)
    set_seed(cfg.train.seed)
    records = select_records(read_records(cfg.records), "warmup")
    if resume:
        llm_dir = run_dir / CHECKPOINT_DIR / LLM_DIR
        tokenizer = load_tokenizer(llm_dir)
        llm = load_llm(llm_dir, cfg.llm_options)
    else:
        tokenizer = train_tokenizer(corpus_texts(records, cfg.answer_style), vocab_size=cfg.vocab_size)
        llm = build_embedded_llm(tokenizer, cfg.embedded_lm)
    dataset = ChatDataset(records, tokenizer, supervise="all", max_tokens=cfg.train.max_tokens,
                          answer_style=cfg.answer_style, shuffle_options=cfg.shuffle_options,
                          blind_answers=cfg.blind_warmup, seed=cfg.train.seed)
    accelerator = make_accelerator(cfg.train)

    def loss_fn(model: nn.Module, batch: ChatBatch) -> Tensor:
        batch = batch.to(accelerator.device)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                     use_cache=False).loss

    def save_model(folder: Path, state: dict[str, Tensor]) -> None:
        llm.save_pretrained(folder / LLM_DIR, state_dict=state)
        tokenizer.save_pretrained(folder / LLM_DIR)

    lengths = dataset.text_lengths() if cfg.train.group_by_length else None
    return PreparedRun(cfg, run_dir, resume, accelerator, llm, dataset, ChatCollator(tokenizer.pad_token_id), loss_fn, save_model,
                       lengths=lengths)


def _build_encoder(cfg: TuneConfig, store: FeatureStore, start: CheckpointFolder | None) -> TopoPackEncoder:
    """The encoder of the checkpoint the run starts from (its own when resumed), else from --encoder or fresh."""
    if start is not None:
        return load_checkpoint_encoder(start)
    if cfg.encoder is not None:
        enc_dir = Path(cfg.encoder)
        if cfg.encoder_init == "pretrained":
            return load_encoder(enc_dir)
        if not (enc_dir / CONFIG_NAME).is_file():
            raise CheckpointError(f"{enc_dir / CONFIG_NAME}: not found; --encoder must be a topo-pack encoder folder")
        return TopoPackEncoder(TopoPackConfig.load(enc_dir / CONFIG_NAME))
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise CheckpointError(f"{store.root}: no feature files; run `slidevl preprocess` first")
    sf = store.load(slide_ids[0])
    return TopoPackEncoder(
        TopoPackConfig(
            patch_dim=int(sf.patch_features.shape[1]),
            pack_dim=0 if sf.pack_features is None else int(sf.pack_features.shape[1]),
            global_dim=0 if sf.global_feature is None else int(sf.global_feature.shape[0]),
            pack_size=sf.pack_size,
        )
    )


def _llm_width(llm: nn.Module) -> int:
    return int(llm.get_input_embeddings().weight.shape[1])


def prepare_stage(cfg: TuneConfig, *, resume: bool = False) -> PreparedRun:
    """Build everything stage 1 or 2 trains, up to (not including) the first step."""
    if cfg.stage not in ("stage1", "stage2"):
        raise ValueError(f"run_stage needs stage 'stage1' or 'stage2', got {cfg.stage!r}")
    init = open_checkpoint(cfg.init) if cfg.init else None
    if init is not None and set(cfg.connector.given()) - READ_OPTIONS - CONVERTIBLE_OPTIONS:
        raise InputError(
            f"--init {init.directory} fixes the connector; drop the connector options other than "
            f"{', '.join(sorted(READ_OPTIONS | CONVERTIBLE_OPTIONS))} (or start without --init)"
        )
    init_adapter = init.adapter_dir if init is not None else None
    if init_adapter is not None and not (cfg.stage == "stage2" and cfg.llm_tuning == "lora"):
        raise InputError(
            f"--init {init.directory} is a stage-2 checkpoint with LoRA adapters; only a stage-2 run with LoRA tuning "
            "can continue them (start stage 1 or full tuning from a stage-1 checkpoint instead)"
        )
    llm_dir = init.llm_dir if init is not None and cfg.llm is None else None
    if llm_dir is None:
        if cfg.llm is None:
            raise InputError("pass --llm (a Hugging Face causal-LM folder or a warm-up run) or --init (a stage-1 run)")
        llm_dir = resolve_llm_dir(cfg.llm)
    job = cfg.job or (init.config.job if init is not None else None)
    if job is None:
        raise InputError("pass --job: the feature job folder holding the slides' features")
    feature_encoder = cfg.feature_encoder or (init.config.feature_encoder if init is not None else None)
    store = FeatureStore(job, feature_encoder)
    records = select_records(read_records(cfg.records), cfg.stage)
    if not records:
        wanted = "caption" if cfg.stage == "stage1" else "single/multi/open"
        raise InputError(f"{cfg.records}: no {wanted} records for {cfg.stage}")

    run_dir = _prepare_run_dir(cfg, resume)
    resumed = open_checkpoint(run_dir / CHECKPOINT_DIR) if resume else None
    # Weights come from this run's own checkpoint when resuming, else from --init.
    start = resumed or init
    set_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg.train)
    if cfg.train_encoder and accelerator.distributed_type == DistributedType.FSDP:
        # A trained encoder is saved from its live module, which FSDP would hold in shards.
        raise InputError("--train-encoder is not supported under FSDP; launch with configs/accelerate/ddp.yaml")

    tokenizer = load_tokenizer(init.tokenizer_dir if init is not None else llm_dir)
    full_llm = cfg.stage == "stage2" and cfg.llm_tuning == "full"
    llm = freeze(load_llm(resumed.llm_dir if full_llm and resumed is not None else llm_dir, cfg.llm_options))
    encoder = _build_encoder(cfg, store, start)
    if cfg.train_encoder:
        encoder.train()
    else:
        freeze(encoder).eval()
    conn_cfg = (
        replace(init.config.connector, **cfg.connector.given())
        if init is not None
        else cfg.connector_config(encoder.config.d_model, _llm_width(llm), encoder.config.patch_dim)
    )
    # The --init weights are loaded as they were saved, then converted after the visuals are ready.
    saved_cfg = init.config.connector if init is not None and resumed is None else conn_cfg
    connector = build_connector(replace(conn_cfg, patch_scaling=saved_cfg.patch_scaling))
    adapter = start.adapter_dir if start is not None else None
    lora = None
    if full_llm:
        llm.requires_grad_(True)
    elif cfg.stage == "stage2":
        # Resuming reloads this run's adapters; a stage-2 checkpoint as --init keeps training its own.
        lora = start.config.llm.lora if adapter is not None else cfg.lora
        llm = load_lora(llm, adapter, trainable=True) if adapter is not None else add_lora(llm, cfg.lora)
    model = SlideVLM(connector, llm, image_token_id=image_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if start is not None:
        connector.load_state_dict(load_tensors(start.connector_weights), strict=True)

    placed = not cfg.llm_options.load_in_4bit
    if not placed:
        connector.to(accelerator.device)
    encoder.to(accelerator.device)
    if cfg.train_encoder:
        visuals: CachedVisuals | LiveVisuals = LiveVisuals(encoder, store, device=accelerator.device)
    else:
        visuals = CachedVisuals(encoder, store, run_dir / CACHE_DIR, device=accelerator.device)
    # The main process fills the disk cache; the others then read it instead of encoding too.
    with accelerator.main_process_first():
        visuals.precompute(r.slide for r in records)
    check_regions(records, visuals)
    if start is None:
        fit_standardizers(connector, visuals, (r.slide for r in records))
    elif connector.config.patch_scaling != conn_cfg.patch_scaling:
        if conn_cfg.patch_scaling != "per_dim":
            raise InputError(f"--init {cfg.init} scales patch features per dimension; it cannot go back to one shared scale")
        connector.scale_patches_per_dim(training_patches(visuals, (r.slide for r in records)))

    config = SlideVLMConfig(
        stage=cfg.stage,
        encoder=encoder.config,
        connector=conn_cfg,
        llm=LLMSettings(base=str(llm_dir.resolve()), options=cfg.llm_options,
                        tuning="full" if full_llm else "lora" if lora is not None else "frozen", lora=lora),
        answer_style=cfg.answer_style,
        job=str(Path(job).resolve()),
        feature_encoder=store.encoder,
    )
    module = TuningModule(model, visuals, encoder if cfg.train_encoder else None)
    dataset = ChatDataset(records, tokenizer, supervise="answer", max_tokens=cfg.train.max_tokens,
                          answer_style=cfg.answer_style, shuffle_options=cfg.shuffle_options, seed=cfg.train.seed)

    def save_model(folder: Path, state: dict[str, Tensor]) -> None:
        model.save_pretrained(folder, tokenizer, config=config, encoder=encoder, state=state_part(state, "vlm."))

    lengths = sequence_lengths(dataset, model, visuals) if cfg.train.group_by_length else None
    return PreparedRun(
        cfg, run_dir, resume, accelerator, module, dataset, ChatCollator(tokenizer.pad_token_id), _module_loss, save_model, placed,
        lengths=lengths,
    )


def sequence_lengths(dataset: ChatDataset, vlm: SlideVLM, visuals: CachedVisuals | LiveVisuals) -> list[int]:
    """Each record's length in the LLM: its text tokens, the image placeholder replaced by the connector's rows."""
    with torch.no_grad():
        slides = {s: visuals.get(s) for s in dict.fromkeys(r.slide for r in dataset.records)}
    lengths = []
    for record, n_text in zip(dataset.records, dataset.text_lengths()):
        vis = vlm.visual_input(slides[record.slide], record.bbox)
        n_patches = 0 if vis.patches is None else int(vis.patches.shape[0])
        lengths.append(n_text - 1 + vlm.connector.output_length(int(vis.tokens.shape[0]), n_patches))
    return lengths


def fit_standardizers(connector: nn.Module, visuals: CachedVisuals | LiveVisuals, slide_ids: Iterable[str]) -> None:
    """Fit the connector's input standardisers on every token (and patch) of the training slides."""
    config = connector.config
    slide_ids = sorted(set(slide_ids))
    with torch.no_grad():
        slides = [visuals.get(s) for s in slide_ids]
        connector.standardize.fit(torch.cat([v.select(None, use_global=config.use_global) for v in slides]).detach())
    if config.reads_patches:
        connector.patch_standardize.fit(training_patches(visuals, slide_ids))


def training_patches(visuals: CachedVisuals | LiveVisuals, slide_ids: Iterable[str]) -> Tensor:
    """(N, patch_dim) features of every patch of the training slides."""
    with torch.no_grad():
        return torch.cat([visuals.get(s).patches_in(None) for s in sorted(set(slide_ids))])


def _module_loss(module: nn.Module, batch: ChatBatch) -> Tensor:
    return module(batch)


def run_stage(cfg: TuneConfig, *, resume: bool = False) -> LoopResult:
    """Stage 1 (connector on captions) or stage 2 (connector + LoRA on VQA)."""
    return prepare_stage(cfg, resume=resume).run()
