"""The representation stage (``represent``): the Q-Former trained on slide–caption pairs
with BLIP-2's ITC + ITM + ITG losses (:mod:`slidevl.slidellm.qformer_pretrain`), before
stage 1.

Same inputs as stage 1 (caption records, feature job, frozen topo-pack encoder, the LLM
folder) and the same checkpoint layout, so ``stage1 --init <this run>`` starts from it:
the connector's standardisers, patch projection, Q-Former and queries carry over; its
projection to the LLM width is not trained here (stage 1 trains it). The LLM's weights
are never loaded, only its tokenizer (the captions' tokens) and its width. The stage's
own heads are saved next to the connector (``represent_heads.safetensors``) for
``--resume`` and ignored by every later stage.

At the end the stage scores itself on its training captions (``represent_eval.json``):
the three losses, and how often a slide region's most similar caption (by ITC) is one of
its own, against the rate a random pick would reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from slidevl.atomic import write_json_atomic
from slidevl.errors import InputError
from slidevl.features.store import FeatureStore
from slidevl.qa.records import VQARecord, read_records
from slidevl.slidellm.checkpoint_layout import CHECKPOINT_DIR, open_checkpoint, save_checkpoint_parts
from slidevl.slidellm.connector import QFormerConnector, build_connector
from slidevl.slidellm.encoder.io import save_state_dict
from slidevl.slidellm.llm import freeze
from slidevl.slidellm.model import batch_connector_inputs, connector_input
from slidevl.slidellm.qformer_pretrain import (
    RepresentationHeads,
    RepresentationLosses,
    itc_similarity,
    representation_losses,
)
from slidevl.slidellm.tokenizer import load_tokenizer
from slidevl.slidellm.tuning.checkpoint import resolve_llm_dir
from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.tuning.loop import LoopResult, make_accelerator
from slidevl.slidellm.tuning.stages import (
    CACHE_DIR,
    PreparedRun,
    _build_encoder,
    _llm_width,
    _prepare_run_dir,
    fit_standardizers,
)
from slidevl.slidellm.tuning.state import load_tensors, state_part
from slidevl.slidellm.tuning.visual import CachedVisuals, check_regions
from slidevl.slidellm.vlm_config import LLMSettings, SlideVLMConfig
from slidevl.slidellm.vqa_data import select_records

HEADS_NAME = "represent_heads.safetensors"
EVAL_NAME = "represent_eval.json"


@dataclass
class CaptionBatch:
    """Right-padded caption tokens and the slide regions they describe."""

    text_ids: Tensor  # (B, L)
    text_valid: Tensor  # (B, L) bool
    slides: list[str]
    bboxes: list[tuple[int, int, int, int] | None]
    captions: list[str]

    @property
    def regions(self) -> list[tuple[str, tuple[int, int, int, int] | None]]:
        return list(zip(self.slides, self.bboxes))

    def positives(self) -> Tensor:
        return belonging_pairs(self.captions, self.regions)


def belonging_pairs(captions: Sequence[str], regions: Sequence[tuple[str, object]]) -> Tensor:
    """(N, N) bool: region i and caption j belong together when j's text is i's caption or j describes i's region."""
    n = len(captions)
    return torch.tensor([[captions[i] == captions[j] or regions[i] == regions[j] for j in range(n)] for i in range(n)])


class CaptionDataset(Dataset):
    """Caption records as token ids of their caption text (no chat template: the Q-Former reads plain text)."""

    def __init__(self, records: Sequence[VQARecord], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> None:
        if not records:
            raise ValueError("no caption records for the representation stage")
        self.records = list(records)
        self.ids = []
        for r in self.records:
            ids = tokenizer(r.answer.strip(), add_special_tokens=False)["input_ids"][:max_tokens]
            if not ids:
                raise InputError(f"caption record {r.id!r}: its caption has no tokens; fix or drop the record")
            self.ids.append(ids)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.ids)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[VQARecord, list[int]]:
        return self.records[index], self.ids[index]


def collate_captions(items: Sequence[tuple[VQARecord, list[int]]]) -> CaptionBatch:
    length = max(len(ids) for _, ids in items)
    text_ids = torch.zeros(len(items), length, dtype=torch.long)
    text_valid = torch.zeros(len(items), length, dtype=torch.bool)
    for i, (_, ids) in enumerate(items):
        text_ids[i, : len(ids)] = torch.tensor(ids)
        text_valid[i, : len(ids)] = True
    records = [r for r, _ in items]
    return CaptionBatch(text_ids, text_valid, [r.slide for r in records], [r.bbox for r in records],
                        [r.answer.strip() for r in records])


class RepresentationModule(nn.Module):
    """What the optimiser sees: the connector (its projection frozen) and the stage's heads."""

    def __init__(self, connector: QFormerConnector, heads: RepresentationHeads, visuals: CachedVisuals) -> None:
        super().__init__()
        self.connector = connector
        self.heads = heads
        self.visuals = visuals

    def image(self, batch: CaptionBatch) -> tuple[Tensor, Tensor]:
        """The connector's standardised inputs (B, S, vision_dim) for the batch's regions, and their mask."""
        device = self.connector.queries.device
        config = self.connector.config
        inputs = [connector_input(config, self.visuals.get(s), bbox).to(device) for s, bbox in zip(batch.slides, batch.bboxes)]
        return self.connector.merged_inputs(*batch_connector_inputs(config, inputs))

    def losses(self, batch: CaptionBatch) -> RepresentationLosses:
        device = self.connector.queries.device
        image, image_valid = self.image(batch)
        return representation_losses(self.connector, self.heads, image, image_valid, batch.text_ids.to(device),
                                     batch.text_valid.to(device), batch.positives().to(device))

    def forward(self, batch: CaptionBatch) -> Tensor:
        return self.losses(batch).total


def _loss(module: nn.Module, batch: CaptionBatch) -> Tensor:
    return module(batch)


def _llm_width_of(llm_dir: Path) -> int:
    # The LLM built on the meta device: its width without loading (or allocating) a weight.
    config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
    with torch.device("meta"):
        return _llm_width(AutoModelForCausalLM.from_config(config))


def prepare_represent(cfg: TuneConfig, *, resume: bool = False) -> PreparedRun:
    """Build the representation stage up to its first step (see the module docstring)."""
    if cfg.stage != "represent":
        raise ValueError(f"prepare_represent needs stage 'represent', got {cfg.stage!r}")
    if cfg.init is not None:
        raise InputError("the representation stage starts a fresh Q-Former; drop --init (stage 1 takes this run as --init)")
    if cfg.train_encoder:
        raise InputError("the representation stage reads the frozen encoder's cached outputs; drop --train-encoder")
    if cfg.llm is None:
        raise InputError("pass --llm (a Hugging Face causal-LM folder or a warm-up run): its tokenizer and width are used")
    if cfg.job is None:
        raise InputError("pass --job: the feature job folder holding the slides' features")
    llm_dir = resolve_llm_dir(cfg.llm)
    store = FeatureStore(cfg.job, cfg.feature_encoder)
    records = select_records(read_records(cfg.records), "represent")
    if not records:
        raise InputError(f"{cfg.records}: no caption records for the representation stage")

    run_dir = _prepare_run_dir(cfg, resume)
    resumed = open_checkpoint(run_dir / CHECKPOINT_DIR) if resume else None
    set_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg.train)
    if accelerator.distributed_type == DistributedType.FSDP:
        # No LLM here to shard, and the closing evaluation reads the live (whole) modules.
        raise InputError("the representation stage runs without FSDP; launch it with configs/accelerate/ddp.yaml")
    tokenizer = load_tokenizer(llm_dir)
    encoder = freeze(_build_encoder(cfg, store, resumed)).eval()
    conn_cfg = cfg.connector_config(encoder.config.d_model, _llm_width_of(llm_dir), encoder.config.patch_dim)
    if conn_cfg.kind != "qformer":
        raise InputError(f"the representation stage trains a Q-Former; the connector is {conn_cfg.kind!r}")
    connector = build_connector(conn_cfg)
    # The projection to the LLM width has no part in these losses; stage 1 trains it.
    connector.proj.requires_grad_(False)
    dataset = CaptionDataset(records, tokenizer, cfg.train.max_tokens)
    heads = RepresentationHeads(connector, len(tokenizer), dataset.longest)
    if resumed is not None:
        connector.load_state_dict(load_tensors(resumed.connector_weights), strict=True)
        heads.load_state_dict(load_tensors(resumed.directory / HEADS_NAME), strict=True)

    encoder.to(accelerator.device)
    visuals = CachedVisuals(encoder, store, run_dir / CACHE_DIR, device=accelerator.device)
    # The main process fills the disk cache; the others then read it instead of encoding too.
    with accelerator.main_process_first():
        visuals.precompute(r.slide for r in records)
    check_regions(records, visuals)
    if resumed is None:
        fit_standardizers(connector, visuals, (r.slide for r in records))

    config = SlideVLMConfig(
        stage="represent",
        encoder=encoder.config,
        connector=conn_cfg,
        llm=LLMSettings(base=str(llm_dir), options=cfg.llm_options),
        answer_style=cfg.answer_style,
        job=str(Path(cfg.job).resolve()),
        feature_encoder=store.encoder,
    )
    module = RepresentationModule(connector, heads, visuals)

    def save_model(folder: Path, state: dict[str, Tensor]) -> None:
        save_checkpoint_parts(folder, config, state_part(state, "connector."), encoder.state_dict(), tokenizer)
        save_state_dict(state_part(state, "heads."), folder / HEADS_NAME, metadata={"format": "pt"})

    # No lengths, so group_by_length leaves this stage's batches shuffled: the contrastive and
    # matching losses take their negatives from the batch, and batches of like-length captions
    # would mostly hold one level's captions, which changes what those losses teach.
    return PreparedRun(cfg, run_dir, resume, accelerator, module, dataset, collate_captions, _loss, save_model)


@torch.no_grad()
def evaluate_representation(module: RepresentationModule, dataset: CaptionDataset, batch_size: int) -> dict[str, float]:
    """Mean ITC/ITM/ITG losses and caption retrieval by ITC similarity over ``dataset`` (eval mode).

    Retrieval ranks every caption of the set for every region (and every region for every
    caption); a hit is a top match that belongs to it (same caption text or same region).
    """
    was_training = module.training
    module.eval()
    sums = {"itc": 0.0, "itm": 0.0, "itg": 0.0}
    image_feats, text_feats, captions, regions = [], [], [], []
    # Hard negatives draw on the global RNG; scoring must not shift the training's draws.
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(dataset), batch_size):
            batch = collate_captions([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            losses = module.losses(batch)
            for name in sums:
                sums[name] += float(getattr(losses, name)) * len(batch.slides)
            image_feats.append(losses.image_feats)
            text_feats.append(losses.text_feats)
            captions += batch.captions
            regions += batch.regions
    module.train(was_training)
    positives = belonging_pairs(captions, regions)
    similarity = itc_similarity(torch.cat(image_feats), torch.cat(text_feats)).cpu()
    n = len(dataset)
    return {
        **{name: total / n for name, total in sums.items()},
        "image_to_text_top1": float(positives[torch.arange(n), similarity.argmax(1)].float().mean()),
        "text_to_image_top1": float(positives[similarity.argmax(0), torch.arange(n)].float().mean()),
        "top1_by_chance": float(positives.float().mean()),
        "captions": n,
        "distinct_captions": len(set(captions)),
    }


def run_represent(cfg: TuneConfig, *, resume: bool = False) -> LoopResult:
    """Train the representation stage, then score it on its captions (``<out>/represent_eval.json``)."""
    prepared = prepare_represent(cfg, resume=resume)
    result = prepared.run()
    if prepared.accelerator.is_main_process:
        module = prepared.accelerator.unwrap_model(prepared.module)
        scores = evaluate_representation(module, prepared.dataset, cfg.train.batch_size)
        write_json_atomic(prepared.run_dir / EVAL_NAME, scores)
    return result
