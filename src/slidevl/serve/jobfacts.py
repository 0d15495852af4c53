"""The chat's answerer without a model: facts measured from the job folder.

:class:`JobFactsAnswerer` answers from what the job already knows (patches, tissue area,
resolution, ROIs, survival evidence) for the slide or the drawn rectangle; it is the
chat's answerer when ``slidevl serve`` is started without ``--vqa-checkpoint``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import numpy as np

from slidevl.serve.answerer import BBox, History
from slidevl.serve.geometry import area_px, polygons_from_geojson
from slidevl.serve.job import NotAvailableError, ServeJob
from slidevl.serve.overlays import evidence_layers, parse_evidence, parse_rois
from slidevl.serve.tiles import SlideMeta


# Which facts a question asks for, by keyword (word starts, so "mm" does not match "summary").
_TOPICS: dict[str, re.Pattern[str]] = {
    topic: re.compile(r"\b(?:" + "|".join(words) + ")")
    for topic, words in {
        "patches": ("patch", "tile", "how many"),
        "tissue": ("tissue", "area", "mm", "cover"),
        "resolution": ("mpp", "resolution", "magnification", "micron", "µm", "um/px", "objective", "scale"),
        "size": ("size", "dimension", "wide", "width", "height", "tall", "big", "large"),
        "regions": ("region", "pack"),
        "rois": ("roi", "annotat", "label"),
        "evidence": ("prompt", "evidence", "attention", "token", "heat", "risk", "important"),
        "status": ("status", "error", "fail", "processed"),
    }.items()
}


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


def _length(um: float) -> str:
    return f"{_fmt(um / 1000)} mm" if um >= 1000 else f"{_fmt(um)} µm"


class JobFactsAnswerer:
    """Deterministic answers computed from the job folder; needs no model."""

    name = "job-facts"
    description = ("answers from the job's own outputs (feature store, tissue contours, ROIs, survival evidence); "
                   "no VQA model is loaded — start `slidevl serve` with --vqa-checkpoint for model answers")

    def __init__(self, job: ServeJob, meta: Callable[[str], SlideMeta]) -> None:
        self.job = job
        self.meta = meta

    # -- facts ------------------------------------------------------------------------------
    def _mpp(self, slide_id: str) -> float | None:
        return self.job.mpp(slide_id, self.meta(slide_id).mpp)

    def _facts(self, slide_id: str, bbox: BBox | None, topic: str) -> str | None:
        meta = self.meta(slide_id)
        mpp = self._mpp(slide_id)
        where = "in the rectangle" if bbox else "on the slide"
        if topic == "resolution":
            if mpp is None:
                return "The slide's resolution (mpp) is not recorded in the file; preprocess it with --mpp-override."
            return f"The slide is scanned at {_fmt(mpp)} µm per pixel (about {_fmt(10 / mpp)}x equivalent magnification)."
        if topic == "size":
            w, h = (bbox[2] - bbox[0], bbox[3] - bbox[1]) if bbox else (meta.width, meta.height)
            what = "The rectangle" if bbox else "The slide"
            text = f"{what} is {w:,} × {h:,} pixels at level 0"
            return text + (f", i.e. {_fmt(w * mpp / 1000)} × {_fmt(h * mpp / 1000)} mm." if mpp else ".")
        if topic == "status":
            entry = self.job.get(slide_id)
            return f"Preprocessing status: {entry.status}" + (f" ({entry.error})." if entry.error else ".")
        if topic in ("patches", "regions"):
            try:
                table = self.job.patches(slide_id)
            except NotAvailableError:
                return "This slide has no feature file, so there are no patches to count."
            mask = table.in_box(bbox) if bbox else np.ones(table.n, bool)
            if topic == "patches":
                side = f" of {_length(table.patch_size * mpp)}" if mpp else ""
                return (f"There are {int(mask.sum())} tissue patches{side} {where} "
                        f"(mean tissue fraction {float(table.tissue[mask].mean()) if mask.any() else 0:.2f}).")
            regions = len(np.unique(table.region_index[mask]))
            if mpp is None:
                return f"The patches {where} fall in {regions} region(s)."
            return f"The patches {where} fall in {regions} region(s) of {_length(table.region_size * mpp)}."
        if topic == "tissue":
            path = self.job.file_for(slide_id, "tissue")
            if path is None:
                return "No tissue contours were written for this slide."
            polys = polygons_from_geojson(self.job.read_json(slide_id, "tissue"))
            px2 = area_px(polys, bbox)
            if mpp is None:
                return f"Tissue covers {px2:,.0f} px² {where} (mm² needs the slide's mpp)."
            mm2 = px2 * (mpp / 1000) ** 2
            if bbox:
                box_px2 = (bbox[2] - bbox[0]) * (bbox[3] - bbox[1])
                return f"Tissue covers {mm2:.3f} mm² {where} ({100 * px2 / box_px2:.0f}% of the rectangle)."
            return f"Tissue covers {mm2:.3f} mm² {where}."
        if topic == "rois":
            if self.job.file_for(slide_id, "rois") is None:
                return "No ROIs were constructed for this slide."
            rois = parse_rois(self.job.read_json(slide_id, "rois"), f"rois/{slide_id}.json").rois
            if bbox:
                rois = [r for r in rois if r.bbox[0] < bbox[2] and r.bbox[2] > bbox[0] and r.bbox[1] < bbox[3] and r.bbox[3] > bbox[1]]
            if not rois:
                return "No ROI overlaps the rectangle."
            return f"{len(rois)} ROI(s) {where}: " + "; ".join(f"{r.id} ({r.label or 'unlabelled'})" for r in rois) + "."
        if topic == "evidence":
            return self._evidence(slide_id, bbox, where)
        return None

    def _evidence(self, slide_id: str, bbox: BBox | None, where: str) -> str:
        if self.job.file_for(slide_id, "evidence") is None:
            return "No survival evidence is available for this slide (start the viewer with --survival-run)."
        source = f"evidence/{slide_id}.json"
        ev = parse_evidence(self.job.read_json(slide_id, "evidence"), source)
        try:
            table = self.job.patches(slide_id)
        except NotAvailableError:
            table = None
        payload = evidence_layers(ev, table, source)
        parts = []
        for layer in payload["layers"]:
            coords = np.asarray(layer["coords"], float).reshape(-1, 2)
            size = layer["size"]
            mask = np.ones(len(coords), bool)
            if bbox and layer["level"] == "patch":
                # Patches count when their centre is inside, as in the patch count above.
                centre = coords + size / 2
                mask = (centre[:, 0] >= bbox[0]) & (centre[:, 0] < bbox[2]) & (centre[:, 1] >= bbox[1]) & (centre[:, 1] < bbox[3])
            elif bbox:
                # Region tokens are usually larger than the rectangle: any overlap counts.
                mask = (coords[:, 0] < bbox[2]) & (coords[:, 0] + size > bbox[0]) & (coords[:, 1] < bbox[3]) & (coords[:, 1] + size > bbox[1])
            kept = layer["kept"] is not None
            if kept:
                mask &= np.asarray(layer["kept"], bool)
            name = layer["name"].replace("_", " ")
            if not mask.any():
                parts.append(f"{name}: no {'kept ' if kept else ''}tokens {where}")
                continue
            score = np.asarray(layer["score"], float)[mask]
            text = f"{name}: {int(mask.sum())} {'kept ' if kept else ''}tokens {where}, mean score {score.mean():.3g}"
            if layer["prompt"] is not None:
                top, k = Counter(np.asarray(layer["prompt"])[mask].tolist()).most_common(1)[0]
                prompts = payload["prompts"].get(layer["level"], [])
                label = prompts[top]["text"] if 0 <= top < len(prompts) else "an unlisted prompt"
                text += f", most often matched to “{label}” ({k} tokens)"
            parts.append(text)
        return f"Survival evidence ({ev.model or 'model'}): " + "; ".join(parts) + "."

    # -- protocol ---------------------------------------------------------------------------
    def answer(self, slide_id: str, question: str, bbox: BBox | None, history: History) -> str:
        q = question.lower()
        topics = [t for t, pattern in _TOPICS.items() if pattern.search(q)]
        if not topics:
            # An open question gets the overview; the reply says what can be asked.
            topics = ["size", "resolution", "patches", "tissue"]
            lead = ("I answer from the job's measurements, not from a VQA model. Here is what I know "
                    "(ask about patches, tissue area, resolution, size, regions, ROIs or evidence): ")
        else:
            lead = ""
        facts = [f for f in (self._facts(slide_id, bbox, t) for t in topics) if f]
        if bbox:
            mpp = self._mpp(slide_id)
            w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
            extent = f"{_length(w * mpp)} × {_length(h * mpp)}" if mpp else f"{w} × {h} px"
            lead = f"Rectangle [{', '.join(map(str, bbox))}] ({extent}): " + lead
        return lead + " ".join(facts)
