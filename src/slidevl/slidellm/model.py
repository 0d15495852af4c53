"""The slide LLM: topo-pack encoder tokens → connector → causal LM, and back to text.

Data path of one question::

    SlideFeatures ──encode_slide──▶ VisualTokens (summary tokens, global token, pack boxes,
                                                  patch features and boxes)
                   ──visual_input(bbox)──▶ VisualInput ((T, d) tokens [+ (n, d_patch) patches])
                   ──connector──▶ (T', llm width)
    chat text with one <image> ──▶ token embeddings with the T' visual rows spliced in
                   ──▶ causal LM ──▶ loss on the assistant answer, or generated answer

A region question carries a level-0 bbox: only the summary tokens of packs whose box
intersects it are kept (the global token stays), and, for a connector that reads patches,
the tile features of the patches under the box. The encoder runs once per slide, on the
whole slide, so the selected summaries still carry slide context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from slidevl.errors import CheckpointError, InputError
from slidevl.features.store import SlideFeatures
from slidevl.slidellm.checkpoint_layout import (
    ADAPTER_DIR,
    LLM_DIR,
    CheckpointFolder,
    load_checkpoint_encoder,
    open_checkpoint,
    save_checkpoint_parts,
)
from slidevl.slidellm.connector import (ConnectorConfig, ConnectorInputs, ConnectorOutput, MLPConnector, QFormerConnector,
                                       build_connector)
from slidevl.slidellm.encoder import TopoPackBatch, TopoPackEncoder, batch_from_slide_features
from slidevl.slidellm.llm import LLMLoadOptions, freeze, load_llm, load_lora
from slidevl.slidellm.tokenizer import image_token_id, load_tokenizer
from slidevl.slidellm.tuning.state import load_tensors, state_part
from slidevl.slidellm.vlm_config import SlideVLMConfig

IGNORE_INDEX = -100

BBox = tuple[int, int, int, int]


class SlideVLMError(InputError):
    """Inputs that the slide LLM cannot use (bad box, missing placeholder, ...)."""


def parse_bbox(text: str) -> BBox:
    """Parse ``"x0,y0,x1,y1"`` (level-0 pixels) into a validated box."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise SlideVLMError(f"bbox {text!r} must be four integers x0,y0,x1,y1 in level-0 pixels, e.g. 0,0,4096,4096")
    x0, y0, x1, y1 = values
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise SlideVLMError(f"bbox {text!r} needs 0 <= x0 < x1 and 0 <= y0 < y1")
    return values  # type: ignore[return-value]


def patch_step_level0(sf: SlideFeatures) -> float:
    """Level-0 edge of one patch, recovered from the store's coords and lattice positions.

    ``slidevl preprocess`` records the exact value (``patch_size_level0``). Stores without
    it (imported features) get a least-squares fit of the grid contract, which puts patch
    (col, row) at ``round(col * step), round(row * step)``: the fit is within half a pixel
    divided by the largest grid index. Either way the coords must agree with the step.
    """
    grid = np.asarray(sf.patch_grid, dtype=np.float64).ravel()
    coords = np.asarray(sf.patch_coords, dtype=np.float64).ravel()
    recorded = sf.attrs.get("patch_size_level0")
    if recorded is not None:
        step = float(recorded)
    else:
        denom = float(grid @ grid)
        if denom == 0:
            raise SlideVLMError(
                f"slide {sf.slide_id!r}: every patch sits at grid (0, 0) and the file has no patch_size_level0 "
                "attribute, so the patch size in level-0 pixels is unknown; re-run `slidevl preprocess` for it"
            )
        step = float(grid @ coords) / denom
    worst = float(np.abs(np.rint(grid * step) - coords).max())
    if worst > 1.0:
        raise SlideVLMError(
            f"slide {sf.slide_id!r}: patch/coords are not on a regular lattice anchored at (0, 0) "
            f"(off by {worst:.1f} px); re-run `slidevl preprocess` for this slide"
        )
    return step


def boxes_intersecting(boxes: Tensor, bbox: Sequence[int]) -> Tensor:
    """Indices of the (P, 4) ``boxes`` that overlap ``bbox``; all boxes are level-0 with exclusive ends."""
    x0, y0, x1, y1 = (int(v) for v in bbox)
    hit = (boxes[:, 0] < x1) & (x0 < boxes[:, 2]) & (boxes[:, 1] < y1) & (y0 < boxes[:, 3])
    return torch.nonzero(hit).flatten()


@dataclass
class VisualTokens:
    """Encoder output of one slide, as the connector consumes it.

    ``pack_boxes`` are level-0 ``x0, y0, x1, y1`` (exclusive ends), one per summary token.
    """

    slide_id: str
    summary: Tensor  # (P, d)
    global_token: Tensor  # (d,)
    pack_boxes: Tensor  # (P, 4) int64
    patch_features: Tensor | None = None  # (N, d_patch): the tile encoder's features, in the store's dtype
    patch_boxes: Tensor | None = None  # (N, 4) int64

    def __post_init__(self) -> None:
        p = self.summary.shape[0]
        if self.summary.dim() != 2 or self.global_token.shape != self.summary.shape[1:] or self.pack_boxes.shape != (p, 4):
            raise SlideVLMError(
                f"slide {self.slide_id!r}: inconsistent visual tokens: summary {tuple(self.summary.shape)}, "
                f"global {tuple(self.global_token.shape)}, pack boxes {tuple(self.pack_boxes.shape)}"
            )
        if (self.patch_features is None) != (self.patch_boxes is None) or (
            self.patch_features is not None
            and (self.patch_features.dim() != 2 or self.patch_boxes.shape != (self.patch_features.shape[0], 4))
        ):
            raise SlideVLMError(
                f"slide {self.slide_id!r}: patch features and patch boxes must come together, (N, d) and (N, 4)"
            )

    def packs_in(self, bbox: Sequence[int]) -> Tensor:
        """Indices of the packs whose box intersects ``bbox`` (level-0, exclusive ends)."""
        return boxes_intersecting(self.pack_boxes, bbox)

    def select(self, bbox: Sequence[int] | None = None, *, use_global: bool = True) -> Tensor:
        """(T, d) connector input: summaries of the packs under ``bbox`` (all when None), then the global token."""
        summary = self.summary
        if bbox is not None:
            index = self.packs_in(bbox)
            if index.numel() == 0:
                extent = self.pack_boxes.amin(0)[:2].tolist() + self.pack_boxes.amax(0)[2:].tolist()
                raise SlideVLMError(
                    f"slide {self.slide_id!r}: bbox {list(bbox)} intersects no tissue pack; the packs span "
                    f"level-0 {extent}. Give a box over tissue (level-0 pixels x0,y0,x1,y1)"
                )
            summary = summary[index]
        if use_global:
            return torch.cat([summary, self.global_token[None]], dim=0)
        return summary

    def patches_in(self, bbox: Sequence[int] | None, limit: int | None = None) -> Tensor:
        """(n, d_patch) float32 features of the patches under ``bbox`` (all when None), at most ``limit``.

        More than ``limit`` patches are thinned to ``limit`` evenly spaced ones in grid
        order, so a whole-slide question still sees every part of the slide.
        """
        return self.patch_features[_thinned(self._patch_rows(bbox), limit)].float()  # type: ignore[index]

    def positions_in(
        self, bbox: Sequence[int] | None, limit: int | None = None, *, use_global: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Where each connector input lies in the tissue under ``bbox``: ``(x, y)`` in [0, 1].

        Returns one row per token of :meth:`select` (the global token, which has no place,
        is NaN) and one per patch of :meth:`patches_in` (None without patch features). The
        frame is the bounding box of the tissue in view, the patches under ``bbox`` clipped
        to it (the packs when the tokens carry no patches): the frame in which the spatial
        questions name a part of the tissue. A pack that reaches past the box is placed at
        its centre clipped to the frame.
        """
        packs = self.pack_boxes if bbox is None else self.pack_boxes[self.packs_in(bbox)]
        under = None if self.patch_boxes is None else self._patch_rows(bbox)
        frame = (packs if under is None else self.patch_boxes[under]).to(torch.float64)  # type: ignore[index]
        lo, hi = frame[:, :2].amin(0), frame[:, 2:].amax(0)
        if bbox is not None:
            lo = lo.clamp(min=torch.tensor([float(bbox[0]), float(bbox[1])], dtype=torch.float64, device=lo.device))
            hi = hi.clamp(max=torch.tensor([float(bbox[2]), float(bbox[3])], dtype=torch.float64, device=hi.device))
        size = (hi - lo).clamp(min=1.0)

        def place(boxes: Tensor) -> Tensor:
            centre = (boxes[:, :2] + boxes[:, 2:]).to(torch.float64) / 2
            return ((torch.minimum(torch.maximum(centre, lo), hi) - lo) / size).float()

        token_xy = place(packs)
        if use_global:
            token_xy = torch.cat([token_xy, token_xy.new_full((1, 2), float("nan"))])
        patch_xy = None if under is None else place(self.patch_boxes[_thinned(under, limit)])  # type: ignore[index]
        return token_xy, patch_xy

    def _patch_rows(self, bbox: Sequence[int] | None) -> Tensor:
        """Indices of the patches under ``bbox`` (all when None)."""
        if self.patch_features is None or self.patch_boxes is None:
            raise SlideVLMError(
                f"slide {self.slide_id!r}: these visual tokens carry no patch features; encode the slide again "
                "(delete its visual cache) with this version of slidevl"
            )
        rows = torch.arange(self.patch_boxes.shape[0], device=self.patch_boxes.device)
        if bbox is not None:
            rows = boxes_intersecting(self.patch_boxes, bbox)
        return rows

    def tensors(self) -> dict[str, Tensor]:
        """Contiguous CPU tensors, for the safetensors cache."""
        out = {
            "summary": self.summary,
            "global_token": self.global_token,
            "pack_boxes": self.pack_boxes,
            "patch_features": self.patch_features,
            "patch_boxes": self.patch_boxes,
        }
        return {k: v.detach().cpu().contiguous() for k, v in out.items() if v is not None}

    @classmethod
    def from_tensors(cls, slide_id: str, tensors: dict[str, Tensor]) -> "VisualTokens":
        return cls(slide_id, tensors["summary"], tensors["global_token"], tensors["pack_boxes"],
                   tensors.get("patch_features"), tensors.get("patch_boxes"))


@dataclass
class VisualInput:
    """The connector input of one question: summary tokens (T, d), and patch features (n, d_patch) or None.

    For a connector that reads positions, ``token_xy`` (T, 2) and ``patch_xy`` (n, 2) place
    each row in the tissue in view (:meth:`VisualTokens.positions_in`; NaN: no place).
    """

    tokens: Tensor
    patches: Tensor | None = None
    token_xy: Tensor | None = None
    patch_xy: Tensor | None = None

    def to(self, device: torch.device | str) -> "VisualInput":
        return VisualInput(*(None if t is None else t.to(device)
                             for t in (self.tokens, self.patches, self.token_xy, self.patch_xy)))


def encode_slide(encoder: TopoPackEncoder, sf: SlideFeatures, *, device: torch.device | str = "cpu") -> VisualTokens:
    """Run ``encoder`` over a whole slide; gradients flow when the caller enables them.

    The slide's patch features and level-0 patch boxes ride along, for connectors that
    read the patches under a question's box as well as the summary tokens. The features
    keep the store's dtype (float16 by default): a slide of 100k patches stays at half the
    memory in the visual cache, and only the patches a question reads are widened.
    """
    batch = batch_from_slide_features(sf)
    out = encoder(batch.to(device))
    step = patch_step_level0(sf)
    coords = torch.as_tensor(np.asarray(sf.patch_coords), dtype=torch.int64)
    edge = int(round(step))
    return VisualTokens(
        sf.slide_id,
        out.summary_tokens[0],
        out.global_token[0],
        pack_boxes(batch, step),
        torch.as_tensor(np.asarray(sf.patch_features)).to(device),
        torch.cat([coords, coords + edge], dim=1).to(device),
    )


def pack_boxes(batch: TopoPackBatch, patch_step: float) -> Tensor:
    """(P, 4) int64 level-0 boxes of a single-slide batch's packs, in the encoder's pack order."""
    k = batch.pack_size
    origin = batch.pack_origin[0].to(torch.float64)
    lo = torch.round(origin * k * patch_step)
    hi = torch.round((origin + 1) * k * patch_step)
    return torch.cat([lo, hi], dim=1).to(torch.int64)


def slide_pack_boxes(sf: SlideFeatures) -> Tensor:
    """Pack boxes of a slide without running the encoder."""
    return pack_boxes(batch_from_slide_features(sf), patch_step_level0(sf))


def pad_visual(tokens: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-sample (T_i, d) tokens into (B, T_max, d) plus a (B, T_max) validity mask."""
    if not tokens:
        raise SlideVLMError("no visual tokens to batch")
    t_max = max(max(t.shape[0] for t in tokens), 1)
    out = tokens[0].new_zeros(len(tokens), t_max, tokens[0].shape[1])
    valid = torch.zeros(len(tokens), t_max, dtype=torch.bool, device=tokens[0].device)
    for i, t in enumerate(tokens):
        out[i, : t.shape[0]] = t
        valid[i, : t.shape[0]] = True
    return out, valid


def _thinned(rows: Tensor, limit: int | None) -> Tensor:
    """At most ``limit`` of ``rows``, evenly spaced in their order (all when ``limit`` is None)."""
    if limit is None or rows.shape[0] <= limit:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, limit, device=rows.device).round().long()]


def connector_input(config: ConnectorConfig, visual: VisualTokens, bbox: Sequence[int] | None = None) -> VisualInput:
    """What a connector with ``config`` reads for a question about ``bbox`` (the whole slide when None)."""
    tokens = visual.select(bbox, use_global=config.use_global)
    patches = visual.patches_in(bbox, config.max_patches) if config.reads_patches else None
    if not config.positions:
        return VisualInput(tokens, patches)
    token_xy, patch_xy = visual.positions_in(bbox, config.max_patches, use_global=config.use_global)
    return VisualInput(tokens, patches, token_xy, patch_xy if config.reads_patches else None)


def batch_connector_inputs(config: ConnectorConfig, inputs: Sequence[VisualInput]) -> ConnectorInputs:
    """The padded batch of ``inputs``, as the connector's forward takes it."""
    padded, valid = pad_visual([x.tokens for x in inputs])
    token_xy = _padded_required([x.token_xy for x in inputs], "token positions")[0] if config.positions else None
    if not config.reads_patches:
        return ConnectorInputs(padded, valid, token_xy=token_xy)
    patches, patch_valid = _padded_required([x.patches for x in inputs], "patch features")
    patch_xy = _padded_required([x.patch_xy for x in inputs], "patch positions")[0] if config.positions else None
    return ConnectorInputs(padded, valid, patches, patch_valid, token_xy, patch_xy)


def _padded_required(rows: Sequence[Tensor | None], what: str) -> tuple[Tensor, Tensor]:
    """``pad_visual`` of rows the connector reads (``what``), which every sample must have."""
    missing = [i for i, x in enumerate(rows) if x is None]
    if missing:
        raise SlideVLMError(f"the connector reads {what}, but sample(s) {missing} have none")
    return pad_visual(rows)  # type: ignore[arg-type]


class SlideVLM(nn.Module):
    """Connector + causal LM (optionally LoRA-wrapped), and the slide encoder once loaded.

    In training the encoder usually runs once per slide ahead of the steps (its outputs
    are cached), so it is not part of this module's parameters: the tuning loop holds it,
    and calls :func:`encode_slide` inside the step when it trains. A model read with
    :meth:`from_pretrained` holds its frozen encoder and its :class:`SlideVLMConfig`.
    """

    def __init__(
        self,
        connector: QFormerConnector | MLPConnector,
        llm: nn.Module,
        *,
        image_token_id: int,
        pad_token_id: int,
        encoder: TopoPackEncoder | None = None,
        config: SlideVLMConfig | None = None,
    ) -> None:
        super().__init__()
        self.connector = connector
        self.llm = llm
        self.encoder = encoder
        self.config = config
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | CheckpointFolder,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: torch.device | str = "cpu",
        llm_options: LLMLoadOptions | None = None,
    ) -> "SlideVLM":
        """The model in a checkpoint folder (or its run folder), frozen and in eval mode.

        ``tokenizer`` is the checkpoint's own, when the caller has read it already;
        ``llm_options`` overrides how the base LLM is loaded (dtype, 4-bit), by default
        as in training. A checkpoint of the layout before ``config.json`` is read as it is.
        """
        folder = path if isinstance(path, CheckpointFolder) else open_checkpoint(path)
        config = folder.config
        tokenizer = load_tokenizer(folder.tokenizer_dir) if tokenizer is None else tokenizer
        options = llm_options or config.llm.options
        if not (folder.llm_dir / "config.json").is_file():
            raise CheckpointError(
                f"{folder.directory}: its base LLM {folder.llm_dir} is missing; restore that folder (the checkpoint "
                "references it by path)"
            )
        llm = freeze(load_llm(folder.llm_dir, options))
        if folder.adapter_dir is not None:
            llm = load_lora(llm, folder.adapter_dir, trainable=False)
        connector = build_connector(config.connector)
        connector.load_state_dict(load_tensors(folder.connector_weights), strict=True)
        encoder = load_checkpoint_encoder(folder)
        model = cls(freeze(connector), llm, image_token_id=image_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    encoder=freeze(encoder), config=config)
        # A 4-bit LLM was placed on its GPU by bitsandbytes and cannot be moved.
        if options.load_in_4bit:
            connector.to(device)
            encoder.to(device)
        else:
            model.to(device)
        return model.eval()

    def save_pretrained(
        self,
        directory: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        *,
        config: SlideVLMConfig | None = None,
        encoder: TopoPackEncoder | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write ``config.json``, the weights and the tokenizer into ``directory`` (:mod:`~slidevl.slidellm.checkpoint_layout`).

        ``config`` and ``encoder`` default to the model's own. ``state`` is this module's
        state dict when the live one is not whole (under FSDP only the gathered copy is).
        Each file is written atomically; a caller that needs the folder replaced as a
        whole writes it into a fresh folder (:func:`~slidevl.slidellm.tuning.state.atomic_dir`).
        """
        directory = Path(directory)
        config = self.config if config is None else config
        encoder = self.encoder if encoder is None else encoder
        if config is None or encoder is None:
            raise CheckpointError("save_pretrained needs the model's SlideVLMConfig and its encoder")
        state = self.state_dict() if state is None else state
        save_checkpoint_parts(directory, config, state_part(state, "connector."), encoder.state_dict(), tokenizer)
        tuning = config.llm.tuning
        if tuning == "lora" and not isinstance(self.llm, PeftModel):
            raise CheckpointError("the config names LoRA adapters but the LLM has none")
        if tuning in ("lora", "full"):
            where = directory / (ADAPTER_DIR if tuning == "lora" else LLM_DIR)
            self.llm.save_pretrained(where, state_dict=state_part(state, "llm."))
        return directory

    def visual_input(self, visual: VisualTokens, bbox: Sequence[int] | None = None) -> VisualInput:
        """What the connector reads for a question about ``bbox`` (the whole slide when None)."""
        return connector_input(self.connector.config, visual, bbox)

    def _llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def visual_embeds(self, inputs: Sequence[VisualInput]) -> list[Tensor]:
        """Connector outputs, one (T'_i, llm width) tensor per sample, padding removed."""
        out: ConnectorOutput = self.connector(*batch_connector_inputs(self.connector.config, inputs))
        embeds = out.embeds.to(self._llm_dtype())
        return [embeds[i][out.valid[i]] for i in range(len(inputs))]

    def splice(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Sequence[Sequence[Tensor]],
        labels: Tensor | None = None,
        *,
        left_pad: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Replace each ``<image>`` token with its visual embeddings.

        ``input_ids`` / ``attention_mask`` are (B, L) and right-padded; ``images[b]`` holds
        one (T, width) tensor per placeholder of row ``b``, in order. Returns
        ``inputs_embeds`` (B, L', width), the new attention mask and labels (visual rows
        and padding ignored). ``left_pad`` pads on the left, as batched generation needs.
        """
        embed = self.llm.get_input_embeddings()
        safe_ids = input_ids.masked_fill(input_ids == self.image_token_id, self.pad_token_id)
        text = embed(safe_ids)
        rows: list[Tensor] = []
        row_labels: list[Tensor] = []
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            if not bool(attention_mask[b, :n].all()):
                raise SlideVLMError("splice expects right-padded input_ids (padding only at the end of a row)")
            ids = input_ids[b, :n]
            where = torch.nonzero(ids == self.image_token_id).flatten().tolist()
            if len(where) != len(images[b]):
                raise SlideVLMError(
                    f"row {b} has {len(where)} <image> placeholder(s) but {len(images[b])} visual input(s) were given"
                )
            pieces, lab_pieces, start = [], [], 0
            lab = labels[b, :n] if labels is not None else None
            for pos, vis in zip(where, images[b]):
                pieces += [text[b, start:pos], vis.to(text.dtype)]
                if lab is not None:
                    lab_pieces += [lab[start:pos], lab.new_full((vis.shape[0],), IGNORE_INDEX)]
                start = pos + 1
            pieces.append(text[b, start:n])
            rows.append(torch.cat(pieces, dim=0))
            if lab is not None:
                lab_pieces.append(lab[start:n])
                row_labels.append(torch.cat(lab_pieces, dim=0))
        length = max(r.shape[0] for r in rows)
        width = text.shape[-1]
        embeds = text.new_zeros(len(rows), length, width)
        mask = attention_mask.new_zeros(len(rows), length)
        out_labels = None if labels is None else labels.new_full((len(rows), length), IGNORE_INDEX)
        for b, r in enumerate(rows):
            sl = slice(length - r.shape[0], length) if left_pad else slice(0, r.shape[0])
            embeds[b, sl] = r
            mask[b, sl] = 1
            if out_labels is not None:
                out_labels[b, sl] = row_labels[b]
        return embeds, mask, out_labels

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, visual: Sequence[VisualInput]) -> Tensor:
        """Mean next-token loss on the labelled (answer) tokens of a batch with one image per row."""
        vis = self.visual_embeds(visual)
        embeds, mask, labels = self.splice(input_ids, attention_mask, [[v] for v in vis], labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss

    @torch.no_grad()
    def answer_log_likelihood(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, visual: VisualInput
    ) -> Tensor:
        """(B,) summed log-probability of each row's labelled (answer) tokens, every row about ``visual``.

        The connector runs once: the rows are candidate answers to one question about one image.
        """
        (vis,) = self.visual_embeds([visual])
        embeds, mask, labels = self.splice(input_ids, attention_mask, [[vis]] * input_ids.shape[0], labels)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        picked = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        return (picked * keep).sum(dim=1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Sequence[Sequence[VisualInput]],
        *,
        max_new_tokens: int = 128,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """Greedy decoding; ``images[b]`` are the connector inputs for row ``b``'s placeholders.

        Returns the generated token ids of each row, without the prompt.
        """
        flat = [t for row in images for t in row]
        embedded = self.visual_embeds(flat) if flat else []
        it = iter(embedded)
        nested = [[next(it) for _ in row] for row in images]
        embeds, mask, _ = self.splice(input_ids, attention_mask, nested, left_pad=True)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        results = []
        for row in out.tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id)]
            results.append(row)
        return results

