"""Overlay layers for the viewer, all in level-0 pixel coordinates.

* tissue contours from ``<job>/tissue/<encoder>/<slide>.geojson``;
* the patch / region / pack grid from the feature store;
* ROIs from the VQA data construction (``<rois>/<slide>.json``);
* survival evidence (HiLa OPL tokens, attention heatmaps) from ``<run>/evidence/<slide>.json``.

The page draws them as vector shapes on a canvas, culled to the viewport, so a heatmap is
never rendered into one giant image.

ROI file format::

    {"slide": "<id>", "rois": [{"id": "roi-1", "bbox": [x0, y0, x1, y1], "label": "tumour",
                                "polygon": [[x, y], ...]  # optional}]}

Evidence files are written by the survival run (:mod:`slidevl.survival.evidence`), one
per slide: ``patch`` and ``region`` token tables with ``index`` (row of the slide's feature
file) and/or level-0 ``coords``, and per token ``kept`` (OPL selection), ``prompt_index``
(into that scale's ``prompts[scale]`` table of ``{index, level, label, text}``, where
``level`` is the risk level), ``alignment`` and, for attention models, ``attention``. Each table becomes drawable layers: the kept tokens
coloured by matched prompt, and a heatmap per score.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ValidationError, model_validator

from slidevl.serve.geometry import GeoJSONError, polygons_from_geojson
from slidevl.serve.job import JobError, PatchTable

GridKind = Literal["patch", "region", "pack"]


class ROI(BaseModel):
    id: str
    bbox: tuple[float, float, float, float]
    label: str = ""
    polygon: list[tuple[float, float]] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "ROI":
        x0, y0, x1, y1 = self.bbox
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"ROI {self.id}: bbox must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return self


class ROIFile(BaseModel):
    slide: str
    rois: list[ROI]


class TokenTable(BaseModel):
    """Per-token evidence of one level; every list has one entry per token."""

    index: list[int] | None = None
    coords: list[tuple[float, float]] | None = None
    kept: list[bool] | None = None
    prompt_index: list[int] | None = None
    alignment: list[float] | None = None
    attention: list[float] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "TokenTable":
        lengths = {k: len(v) for k, v in self.__dict__.items() if v is not None}
        if "index" not in lengths and "coords" not in lengths:
            raise ValueError("a token table needs 'index' or 'coords'")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"token table lists differ in length: {lengths}")
        return self

    @property
    def n(self) -> int:
        return len(self.index if self.index is not None else self.coords)


class PromptEntry(BaseModel):
    index: int
    level: int | None = None
    label: str = ""
    text: str


class EvidenceFile(BaseModel):
    slide_id: str
    patient_id: str | None = None
    model: str = ""
    prompts: dict[Literal["patch", "region"], list[PromptEntry]] = {}
    patch: TokenTable | None = None
    region: TokenTable | None = None

    def tables(self) -> list[tuple[Literal["patch", "region"], TokenTable]]:
        return [(lvl, t) for lvl, t in (("patch", self.patch), ("region", self.region)) if t is not None]

    def prompt_position(self, scale: str) -> dict[int, int]:
        """Flat prompt index → position in the scale's prompt list (which fixes its colour and legend entry)."""
        return {p.index: i for i, p in enumerate(self.prompts.get(scale, []))}

    def prompt_texts(self, scale: str) -> list[str]:
        return [f"{p.label}: {p.text}" if p.label else p.text for p in self.prompts.get(scale, [])]

    def prompt_text(self, scale: str, index: int) -> str | None:
        pos = self.prompt_position(scale).get(index)
        return None if pos is None else self.prompt_texts(scale)[pos]


def tissue_layer(geojson: Any, source: str) -> dict[str, Any]:
    """Polygons as lists of rings of [x, y] (rounded to whole level-0 px)."""
    try:
        polys = polygons_from_geojson(geojson)
    except GeoJSONError as exc:
        raise JobError(f"{source}: {exc}; re-run tissue segmentation for this slide") from exc
    return {"polygons": [[np.rint(r).astype(int).tolist() for r in poly] for poly in polys]}


def grid_layer(table: PatchTable, kind: GridKind) -> dict[str, Any]:
    """Top-left corners and the cell edge of the patch, region or pack lattice."""
    coords = {"patch": table.coords, "region": table.region_coords, "pack": table.pack_coords}[kind]
    size = {"patch": table.patch_size, "region": table.region_size, "pack": table.pack_size}[kind]
    if coords is None or size is None:
        return {"kind": kind, "size": None, "coords": []}
    return {"kind": kind, "size": float(size), "coords": np.asarray(coords).astype(int).tolist()}


def parse_rois(data: Any, source: str) -> ROIFile:
    try:
        return ROIFile.model_validate(data)
    except ValidationError as exc:
        raise JobError(f"{source}: not a valid ROI file ({exc.errors()[0]['msg']}); see slidevl.serve.overlays for the format") from exc


def parse_evidence(data: Any, source: str) -> EvidenceFile:
    try:
        return EvidenceFile.model_validate(data)
    except ValidationError as exc:
        raise JobError(f"{source}: not a valid evidence file ({exc.errors()[0]['msg']}); see slidevl.serve.overlays for the format") from exc


def _corners(level: str, table: TokenTable, geometry: PatchTable | None, source: str) -> tuple[np.ndarray, float]:
    """Level-0 corners and cell size of a token table."""
    if geometry is None:
        raise JobError(f"{source}: the slide has no feature file, so its {level} token size is unknown; run `slidevl preprocess`")
    size = geometry.patch_size if level == "patch" else geometry.region_size
    if table.coords is not None:
        return np.asarray(table.coords, np.float64).reshape(-1, 2), float(size)
    ref = geometry.coords if level == "patch" else geometry.region_coords
    if ref is None:
        raise JobError(f"{source}: {level} tokens are given by index but the feature file has no {level} table")
    idx = np.asarray(table.index, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ref)):
        raise JobError(f"{source}: {level} index out of range for {len(ref)} rows; the evidence was written for "
                       "other features — re-run the survival evidence export")
    return np.asarray(ref, np.float64)[idx], float(size)


def evidence_layers(ev: EvidenceFile, geometry: PatchTable | None, source: str) -> dict[str, Any]:
    """Drawable layers: kept tokens coloured by prompt position, and one heatmap per score list."""
    layers = []
    for level, table in ev.tables():
        position = ev.prompt_position(level)
        coords, size = _corners(level, table, geometry, source)
        corners = np.rint(coords).astype(int).tolist()
        base = {"level": level, "size": size, "coords": corners}
        if table.prompt_index is not None:
            score = table.alignment if table.alignment is not None else [1.0] * table.n
            layers.append({**base, "name": f"{level}_opl_tokens", "kind": "tokens", "score": score,
                           "score_range": _range(score), "kept": table.kept,
                           "prompt": [position.get(p, -1) for p in table.prompt_index]})
        for key in ("attention", "alignment"):
            score = getattr(table, key)
            if score is not None:
                layers.append({**base, "name": f"{level}_{key}", "kind": "heatmap", "score": score,
                               "score_range": _range(score), "kept": None, "prompt": None})
    # The page colours tokens by risk level (hue) and prompt within the level (shade).
    prompts = {scale: [{"text": t, "label": p.label, "level": p.level}
                       for t, p in zip(ev.prompt_texts(scale), ev.prompts[scale])]
               for scale in ("patch", "region") if ev.prompts.get(scale)}
    return {"model": ev.model, "prompts": prompts, "layers": layers}


def _range(score: list[float]) -> list[float]:
    return [float(min(score)), float(max(score))] if score else [0.0, 0.0]


def evidence_at(ev: EvidenceFile, geometry: PatchTable | None, source: str, x: float, y: float) -> list[dict[str, Any]]:
    """For the patch and the region token covering level-0 point (x, y): kept, prompt and scores."""
    found = []
    for level, table in ev.tables():
        coords, size = _corners(level, table, geometry, source)
        hit = np.flatnonzero((x >= coords[:, 0]) & (x < coords[:, 0] + size) & (y >= coords[:, 1]) & (y < coords[:, 1] + size))
        if not hit.size:
            continue
        i = int(hit[0])
        item: dict[str, Any] = {"level": level}
        for key in ("kept", "alignment", "attention"):
            values = getattr(table, key)
            if values is not None:
                item[key] = values[i]
        if table.prompt_index is not None:
            item["prompt_index"] = table.prompt_index[i]
            item["prompt_text"] = ev.prompt_text(level, table.prompt_index[i])
        found.append(item)
    return found
